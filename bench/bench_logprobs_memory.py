"""Peak memory of the log-prob / entropy step of one packed row: chunked over loss positions vs whole-row logits.

The step is what the trainer's loss adapter does on the last pipeline stage for one micro-batch: from final
hidden states `[T, H]` and the output layer `[V, H]`, the log-probs of the targets (with autograd), the
entropy (monitoring, no autograd), then backward of a per-token loss into the hidden states and the weight.

* whole row (baseline, `model.logprob_chunk_size=0`): fp32 logits `[T, V]` of every position, then the
  vocab-parallel functions on all of them;
* chunked (`model.logprob_chunk_size`, default 1024): `logprobs.chunked_logprobs` over the positions that
  carry a loss only, `--chunk` positions at a time, forward and backward.

Method: each variant runs in a fresh subprocess that builds the same inputs (fixed seed), reads its peak
resident set size (`ru_maxrss`), runs the step once, and reads the peak again; the step's peak memory is the
difference. Same allocator, same inputs, nothing else running in the process, so the two figures compare
like with like (resident memory counts every byte torch's CPU allocator touched; tracemalloc would not see
tensor storage; glibc is told to mmap every block above 64 KiB so that freed tensors leave the resident set). The row packs sequences of `--seq` tokens with a `--prompt`-token prompt each.

  OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_logprobs_memory [--tokens 16384 --vocab 32768]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(variant: str, tokens: int, vocab: int, hidden_size: int, seq: int, prompt: int, chunk: int) -> dict:
    """One step of `variant` in this process; its peak memory above what the inputs took (after a tiny
    warm-up step of the same variant, so one-off library initialisation is not counted)."""
    if tokens > 64:
        _step(variant, 64, 64, 8, 32, 4, 16)
    return _step(variant, tokens, vocab, hidden_size, seq, prompt, chunk)


def _step(variant: str, tokens: int, vocab: int, hidden_size: int, seq: int, prompt: int, chunk: int) -> dict:
    import torch

    from rlad_megatron.backends.megatron.logprobs import (
        chunked_logprobs,
        vocab_parallel_entropy,
        vocab_parallel_logprobs,
    )

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.05).requires_grad_(True)
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    mask = torch.zeros(tokens)
    for start in range(0, tokens, seq):
        mask[start + prompt - 1 : start + seq - 1] = 1.0
    advantages = torch.randn(tokens, generator=gen)
    before = _peak_mib()
    started = time.perf_counter()
    if variant == "whole":
        logits = hidden @ weight.t()
        logprobs = vocab_parallel_logprobs(logits, targets)
        with torch.no_grad():
            entropy = vocab_parallel_entropy(logits.detach())
        loss = (logprobs * advantages * mask).sum()
    else:
        positions = mask.nonzero().squeeze(-1)
        out = chunked_logprobs(
            hidden.index_select(0, positions),
            weight,
            targets.index_select(0, positions),
            chunk_size=chunk,
            with_entropy=True,
        )
        entropy = out["entropy"]
        loss = (out["logprobs"] * advantages.index_select(0, positions)).sum()
    loss.backward()
    seconds = time.perf_counter() - started
    return {
        "variant": variant,
        "step_peak_mib": _peak_mib() - before,
        "seconds": seconds,
        "loss": float(loss),
        "entropy_mean": float(
            (entropy.sum() / mask.sum()) if variant == "chunked" else (entropy * mask).sum() / mask.sum()
        ),
        "loss_positions": int(mask.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of the packed row")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (sets the matmul cost, not the logits)")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per packed sequence")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence (no loss)")
    parser.add_argument("--chunk", type=int, default=1024, help="model.logprob_chunk_size")
    parser.add_argument("--variant", choices=("whole", "chunked"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="write the results and a markdown table here")
    args = parser.parse_args()
    shape = (args.tokens, args.vocab, args.hidden, args.seq, args.prompt, args.chunk)
    if args.variant:  # child: one measurement, printed as JSON
        print(json.dumps(measure(args.variant, *shape)))
        return
    results = {}
    for variant in ("whole", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in zip(("tokens", "vocab", "hidden", "seq", "prompt", "chunk"), shape)
        ]
        # Every allocation above 64 KiB gets its own mmap and goes back to the OS when freed, so the resident
        # peak follows the live tensors instead of glibc's heap high-water mark.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    whole, chunked = results["whole"], results["chunked"]
    ratio = chunked["step_peak_mib"] / whole["step_peak_mib"]
    same = abs(whole["loss"] - chunked["loss"]) <= 1e-3 * max(1.0, abs(whole["loss"]))
    fp32_logits_mib = 4 * args.tokens * args.vocab / 2**20
    print(
        f"row {args.tokens} tokens ({chunked['loss_positions']} carry a loss), vocab {args.vocab}, hidden "
        f"{args.hidden}, chunk {args.chunk}; fp32 logits of the whole row: {fp32_logits_mib:.0f} MiB"
    )
    for r in (whole, chunked):
        print(f"{r['variant']:8s} step peak {r['step_peak_mib']:8.0f} MiB  {r['seconds']:6.1f} s  loss {r['loss']:.4f}")
    print(f"peak memory ratio chunked / whole row: {ratio:.3f} (target <= 0.25); same loss: {same}")
    table = [
        "| variant | step peak memory | time | loss |",
        "|---|---|---|---|",
        f"| whole-row logits (baseline) | {whole['step_peak_mib']:.0f} MiB | {whole['seconds']:.1f} s | {whole['loss']:.4f} |",
        f"| chunked, {args.chunk} loss positions at a time | {chunked['step_peak_mib']:.0f} MiB | "
        f"{chunked['seconds']:.1f} s | {chunked['loss']:.4f} |",
        "",
        f"Peak memory ratio chunked / whole row: **{ratio:.3f}** (target <= 0.25). One packed row of "
        f"{args.tokens} tokens ({chunked['loss_positions']} carry a loss), vocabulary {args.vocab}, hidden "
        f"{args.hidden}; fp32 logits of the whole row alone are {fp32_logits_mib:.0f} MiB.",
    ]
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratio": ratio, "table": table}, indent=1))


if __name__ == "__main__":
    main()
