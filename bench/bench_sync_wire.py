"""Weight sync into rollout servers: over the wire (one group per pipeline stage) vs through disk.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_sync_wire [--repeats 2] [--steps 3]

Two `rlad serve` servers hold a Qwen3-shaped student (about 40M parameters: vocabulary 32000, tied
embeddings, GQA); `rlad train` runs under torchrun with pipeline parallelism 2 (gloo) and
`rollout.kind=http` pointed at both servers, once with `rollout.sync=distributed` (each stage's sender
broadcasts its own HF-named buckets to both servers) and once with `rollout.sync=disk` (both stages
write one HF folder, both servers load it). Runs alternate; each reports the loop's own `time/sync` per
step. Printed: the median sync time of each path and the ratio disk / distributed (above 1: the wire is
faster). Both paths end with every server on the new version (the loop checks it for the wire; the disk
path's /update_weights_from_disk answers only after loading).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _model(root: Path) -> Path:
    from rlad_megatron.tiny_models import save_tiny_model

    return save_tiny_model(
        root / "student",
        "qwen3",
        seed=0,
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
    )


def _recipe(root: Path, student: Path, urls: list[str], sync: str, steps: int) -> Path:
    recipe = root / f"{sync}.yaml"
    recipe.write_text(f"""
seed: 1
model: {{student: {student}, teacher: {student}}}
algorithm: {{name: grpo, group_size: 2}}
rollout: {{kind: http, urls: [{", ".join(urls)}], max_new_tokens: 4, sync: {sync}, sync_host: 127.0.0.1}}
data: {{train: "task:addition", task_kwargs: {{size: 16}}}}
train: {{num_steps: {steps}, prompts_per_step: 1, lr: 0.01}}
parallel: {{pipeline_model_parallel_size: 2}}
checkpoint: {{interval: 0, save_hf: false}}
eval: {{interval: 0}}
logging: {{tensorboard: false, progress_bar: false}}
""")
    return recipe


def _sync_times(root: Path, recipe: Path, name: str) -> list[float]:
    from rlad_megatron.engines.fleet import free_port

    run_dir = root / name
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "rlad_megatron.train_cli",
        "--config",
        str(recipe),
        f"run_dir={run_dir}",
    ]
    with open(root / f"{name}.log", "wb") as log:
        if subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False).returncode:
            raise SystemExit(f"training failed; see {root / (name + '.log')}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["time/sync"] for r in rows if "time/sync" in r]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = _model(root)
        ports = [free_port() for _ in range(2)]
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        servers = launch_fleet(
            [embedded_server_cmd(str(student), p, weights_root=str(root), threads=1) for p in ports],
            urls,
            str(root / "logs"),
            timeout_s=300,
        )
        times: dict[str, list[float]] = {"distributed": [], "disk": []}
        try:
            for r in range(args.repeats):
                for sync in times:
                    times[sync] += _sync_times(root, _recipe(root, student, urls, sync, args.steps), f"{sync}_{r}")
        finally:
            for s in servers:
                s.stop(grace_s=5)
    params = "about 40M parameters (fp32), PP=2, 2 servers"
    wire, disk = statistics.median(times["distributed"]), statistics.median(times["disk"])
    print(f"model: {params}; {len(times['disk'])} syncs per path")
    for sync, values in times.items():
        print(f"{sync:12s} median {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
    print(f"ratio disk / distributed (median sync time): {disk / wire:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
