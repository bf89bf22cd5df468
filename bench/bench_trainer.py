"""Training throughput and peak memory: the Megatron backend vs a Hugging Face model + torch AdamW.

Both train the same architecture (a Llama-style model of ~28M parameters by default) on the same
variable-length samples (prompt + response) with the same loss (masked NLL of response tokens,
i.e. the `sft` objective) and AdamW settings. Each side runs in its own subprocess so that its
peak RSS (`ru_maxrss`) is its own. The Megatron side packs the batch (`train.micro_batch_tokens`).
Two HF baselines: `HF padded` pads the batch (the usual HF recipe; it computes more positions than
there are tokens), `HF unpadded` runs one sample at a time with gradient accumulation (exactly the
real positions, like packing). The headline ratio is against the unpadded one, the fair comparison of
the backends' compute; the padded one shows what packing buys over the usual recipe. Throughput
counts real tokens (prompt + response, no padding) per second; positions/s counts what each side
computes. The parent also measures this machine's fp32 matmul peak in
the same run (the best fp32 GEMM rate seen over a few large shapes, sampled before and between steps)
and reports achieved model FLOP/s as a fraction of it. Both sides are built and warmed up
first, then their steps alternate (the order rotates every step) so a busy machine slows all alike;
the best step of each side is the least disturbed one. FLOPs per token:
6 * (matmul parameters) + 6 * layers * hidden * mean sequence length (causal attention).

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_trainer [--steps 4] [--hidden 512] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def model_kwargs(args) -> dict:
    return {
        "vocab_size": args.vocab,
        "hidden_size": args.hidden,
        "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": False,
    }


def make_samples(args):
    from rlad_megatron.types import Sample

    rng = random.Random(0)
    return [
        Sample(
            prompt_ids=[rng.randrange(1, args.vocab) for _ in range(rng.randint(16, 48))],
            response_ids=[rng.randrange(1, args.vocab) for _ in range(rng.randint(32, 160))],
            reward=1.0,
        )
        for _ in range(args.batch)
    ]


def run_megatron(args) -> dict:
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.config import RunConfig
    from rlad_megatron.tiny_models import tiny_hf_config

    cfg = RunConfig()
    cfg.algorithm.name, cfg.algorithm.aggregation = "sft", "token_mean"
    cfg.train.lr, cfg.train.clip_grad, cfg.train.micro_batch_tokens = 1e-4, 1.0, args.micro_batch_tokens
    trainer = MegatronTrainer(
        cfg, build_objective(cfg.algorithm), hf_config=tiny_hf_config("llama", **model_kwargs(args))
    )
    samples = make_samples(args)

    def step(i):
        return trainer.train_step(samples, [0.0] * len(samples), i)

    return step, trainer.num_parameters()


def run_hf(args, padded: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from rlad_megatron.backends.megatron.batching import pad_samples
    from rlad_megatron.tiny_models import tiny_hf_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_hf_config("llama", **model_kwargs(args)), dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    samples = make_samples(args)
    batch = pad_samples(samples)
    attention = (
        torch.arange(batch["tokens"].shape[1])
        < torch.tensor([len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]).unsqueeze(1)
    ).long()

    def nll(tokens, attention_mask, targets, mask):
        logits = model(input_ids=tokens, attention_mask=attention_mask).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return -(logp * mask).sum()

    lengths = attention.sum(1).tolist()
    num_loss_tokens = batch["mask"].sum()

    def step(_):
        optimizer.zero_grad(set_to_none=True)
        if padded:
            (nll(batch["tokens"], attention, batch["targets"], batch["mask"]) / num_loss_tokens).backward()
        else:  # one unpadded sample at a time, gradients accumulated: the same loss, only real positions
            for row, length in enumerate(lengths):
                cut = slice(row, row + 1), slice(0, length)
                (
                    nll(batch["tokens"][cut], None, batch["targets"][cut], batch["mask"][cut]) / num_loss_tokens
                ).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


PEAK_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 1024))


def matmul_peak_flops(repeats: int = 5) -> float:
    """Best fp32 GEMM rate seen over a few large shapes (each timed alone; the least disturbed run)."""
    best = 0.0
    for m, k, n in PEAK_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def flops_per_token(args, mean_len: float) -> float:
    attn = args.hidden * args.hidden * 2 + 2 * args.hidden * (args.hidden // args.heads) * args.kv_heads
    matmul_params = args.layers * (attn + 3 * args.hidden * args.ffn) + args.vocab * args.hidden
    return 6 * matmul_params + 6 * args.layers * args.hidden * mean_len


def child(args) -> None:
    """Build one side, then run one timed step per "step" line on stdin (the parent interleaves sides)."""
    torch.set_num_threads(args.threads)
    step, num_parameters = run_megatron(args) if args.child == "megatron" else run_hf(args, args.child == "hf_padded")
    step(0)  # warm-up: allocations and first-call overheads
    print("READY", flush=True)
    for i, line in enumerate(sys.stdin, start=1):
        if line.strip() != "step":
            break
        start = time.perf_counter()
        step(i)
        print(f"TIME {time.perf_counter() - start}", flush=True)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"peak_rss_mb": peak_rss_mb, "num_parameters": num_parameters}), flush=True)


class Side:
    """A child process running one side of the comparison."""

    def __init__(self, name: str, argv: list[str]):
        self.name, self.times = name, []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_trainer", "--child", name, *argv],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise SystemExit(f"{self.name} side exited (rc={self.proc.wait()}) before printing {prefix}")

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        self.times.append(float(self._expect("TIME")))

    def finish(self, tokens: int, positions: int) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        result = json.loads(self._expect("RESULT"))
        self.proc.wait()
        times = sorted(self.times)
        result.update(
            tokens_per_s=tokens / times[0],
            positions_per_s=positions / times[0],
            tokens_per_s_median=tokens / times[len(times) // 2],
            seconds_per_step=times[0],
        )
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (
        ("steps", 4),
        ("batch", 8),
        ("hidden", 512),
        ("ffn", 1408),
        ("layers", 8),
        ("heads", 8),
        ("kv_heads", 4),
        ("vocab", 4096),
        ("micro_batch_tokens", 4096),
        ("threads", 2),
    ):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--child", default="")
    args = parser.parse_args()
    if args.child:
        return child(args)
    argv = list(sys.argv[1:])
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    names = {"hf_padded": "HF padded", "hf_unpadded": "HF unpadded", "megatron": "Megatron"}
    sides = [Side(name, argv) for name in names]  # all built and warmed up, then interleaved
    for i in range(args.steps):
        for side in sides[i % 3 :] + sides[: i % 3]:
            side.step()
        peak = max(peak, matmul_peak_flops(repeats=1))  # sampled between steps too: keep the best
    samples = make_samples(args)
    lengths = [len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples]
    tokens = sum(lengths)
    positions = {"hf_padded": len(lengths) * max(lengths), "hf_unpadded": tokens, "megatron": tokens}
    results = {side.name: side.finish(tokens, positions[side.name]) for side in sides}
    mean_len = tokens / len(samples)
    fpt = flops_per_token(args, mean_len)
    megatron, unpadded, padded = results["megatron"], results["hf_unpadded"], results["hf_padded"]
    print(
        f"model: {megatron['num_parameters'] / 1e6:.1f}M params (HF {padded['num_parameters'] / 1e6:.1f}M), "
        f"{args.batch} samples/step, {tokens} tokens, mean length {mean_len:.0f}, threads {args.threads}"
    )
    print(f"matmul peak (best fp32 GEMM seen, {args.threads} threads): {peak / 1e9:.1f} GFLOP/s")
    for name, r in results.items():
        print(
            f"{names[name]:>12}: {r['tokens_per_s']:8.1f} tokens/s (median {r['tokens_per_s_median']:.1f})  "
            f"{positions[name]} positions, {r['positions_per_s']:.1f} positions/s  {r['seconds_per_step']:.2f} s/step  "
            f"peak RSS {r['peak_rss_mb']:.0f} MB  achieved {fpt * r['tokens_per_s'] / 1e9:.1f} GFLOP/s "
            f"= {fpt * r['tokens_per_s'] / peak:.0%} of matmul peak"
        )
    print(
        f"throughput ratio Megatron / HF unpadded: {megatron['tokens_per_s'] / unpadded['tokens_per_s']:.2f} best step, "
        f"{megatron['tokens_per_s_median'] / unpadded['tokens_per_s_median']:.2f} median step (target >= 1.0)"
    )
    print(
        f"throughput ratio Megatron / HF padded: {megatron['tokens_per_s'] / padded['tokens_per_s']:.2f} best step "
        f"(packing vs padding; per computed position {megatron['positions_per_s'] / padded['positions_per_s']:.2f})"
    )
    print(f"peak RSS ratio Megatron / HF unpadded: {megatron['peak_rss_mb'] / unpadded['peak_rss_mb']:.2f}")
    return None


if __name__ == "__main__":
    main()
