"""Weight-sync benchmark: export a ~100M-parameter TP-sharded student to an HF folder vs the disk limit.

Run (2 gloo processes, TP=2; without torchrun the script starts them itself):
    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_weight_sync [--dtype bf16] [--repeats 5]

Measured in one run, on rank 0:
- export: `write_hf_folder(...)` end to end (TP all-gathers, QKV / gate-up splits, vocab unpad,
  streaming safetensors shards, index, config, atomic rename), collective over both ranks;
- baseline: `safetensors.torch.save_file` of exactly the same HF tensors, already materialised
  in memory, to the same filesystem (what writing the bytes costs with nothing else to do).
Runs alternate (export, baseline, export, ...), each after `os.sync()` so both start from the same
page-cache state, and neither fsyncs. Prints both (best of `--repeats`) and the ratio
export / baseline; the target is <= 1.5.
The model is Qwen3-shaped (GQA 12/4, QK-norm, tied embeddings) with random weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16", help="trainer params and export dtype: bf16 | fp16 | fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work-dir", default="", help="where to write (default: a temporary folder)")
    return parser.parse_args()


def _hf_config_dir(root: Path) -> Path:
    from rlad_megatron.tiny_models import tiny_hf_config

    cfg = tiny_hf_config(
        "qwen3",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    )
    out = root / "hf_config"
    cfg.save_pretrained(str(out))
    return out


def _time_runs(chunks, ctx, root: Path, tensors, dtype, repeats: int):
    """Alternate export and baseline runs, each from a synced page cache; outputs removed."""
    from safetensors.torch import save_file

    from rlad_megatron.backends.megatron.weight_export import write_hf_folder

    export_times, save_times = [], []
    for step in range(repeats):
        os.sync()
        dist.barrier()
        start = time.perf_counter()
        folder = write_hf_folder(
            chunks, root / "export", step, hf_config_dir=root / "hf_config", tp_group=ctx.tp_group, dtype=dtype
        )
        export_times.append(time.perf_counter() - start)
        if ctx.rank == 0:
            if step < repeats - 1:
                shutil.rmtree(folder)
            path = root / f"baseline_{step}.safetensors"
            os.sync()
            start = time.perf_counter()
            save_file(tensors, str(path), metadata={"format": "pt"})
            save_times.append(time.perf_counter() - start)
            path.unlink()
    return export_times, save_times


def main() -> None:

    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.backends.megatron.parallel import destroy_parallel, init_parallel
    from rlad_megatron.backends.megatron.weight_export import (
        export_hf_tensors,
    )
    from rlad_megatron.config import ModelConfig, ParallelConfig
    from rlad_megatron.conversion.arch import parse_dtype

    args = _args()
    dtype = parse_dtype(args.dtype)
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    parallel = ParallelConfig(tensor_model_parallel_size=2)
    ctx = init_parallel(parallel, seed=0)  # needs torchrun --nproc_per_node=2
    shared = [args.work_dir or (tempfile.mkdtemp(prefix="bench_weight_sync_") if ctx.rank == 0 else "")]
    dist.broadcast_object_list(shared, src=0)  # one folder for both ranks
    root = Path(shared[0])
    if ctx.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        _hf_config_dir(root)
    dist.barrier()
    chunks = build_model(root / "hf_config", ModelConfig(transformer_impl="local", params_dtype=dtype_name), parallel)
    num_params = sum(p.numel() for p in chunks[0].parameters()) * 2  # both TP halves (norms counted twice: tiny)

    tensors = {n: t for b in export_hf_tensors(chunks, tp_group=ctx.tp_group, dtype=dtype) for n, t in b}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    export_times, save_times = _time_runs(chunks, ctx, root, tensors, dtype, args.repeats)
    if ctx.rank == 0:
        export, baseline = min(export_times), min(save_times)
        print(
            f"model: {num_params / 1e6:.1f}M params (TP=2 shards), {nbytes / 2**20:.0f} MiB of HF tensors "
            f"({args.dtype}), exported to {root / 'export'}"
        )
        print(f"export (write_hf_folder, TP=2): {export:.3f} s (runs: {', '.join(f'{t:.3f}' for t in export_times)})")
        print(
            f"baseline (save_file of the same tensors): {baseline:.3f} s "
            f"(runs: {', '.join(f'{t:.3f}' for t in save_times)})"
        )
        ratios = sorted(e / b for e, b in zip(export_times, save_times))
        print(
            f"ratio export / baseline: {export / baseline:.2f} best-to-best, "
            f"{ratios[len(ratios) // 2]:.2f} median of paired runs  (target <= 1.5)"
        )
        if not args.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    destroy_parallel(ctx)


def _launch_two_ranks() -> int:
    """Re-run this script under torch.distributed.run with 2 processes (TP=2)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "bench.bench_weight_sync",
        *sys.argv[1:],
    ]
    return subprocess.run(cmd, check=False, cwd=Path(__file__).resolve().parents[1]).returncode


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit(_launch_two_ranks())
    main()
