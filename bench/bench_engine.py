"""Embedded engine vs transformers on the same tiny model, in one run.

1. Decode: tokens/s of EmbeddedEngine.generate vs transformers `generate` (its KV cache on),
   batch 64, 128 new tokens, greedy, EOS ignored so every row decodes the full budget.
2. Teacher scoring: tokens/s of EmbeddedEngine.score vs a plain transformers forward +
   log_softmax + gather on the same sequences.

Targets: decode >= 2x, scoring >= 1x. Usage:
  OMP_NUM_THREADS=2 .venv/bin/python bench/bench_engine.py [--family qwen3] [--batch 64] [--new 128]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def _best_of_interleaved(fn_a, fn_b, repeats: int):
    """Best wall time of each, alternating a and b so a burst of load on the shared machine hits both."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="qwen3")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from rlad_megatron.rollout.base import SamplingParams
    from rlad_megatron.rollout.embedded import EmbeddedEngine
    from rlad_megatron.testing import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_model(tmp, args.family, tokenizer=False)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        engine = EmbeddedEngine(tmp, max_batch_size=args.batch)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, hf.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.new, ignore_eos=True)
    num_tokens = args.batch * args.new

    def run_hf():
        with torch.inference_mode():
            # eos_token_id=None: no EOS stopping and no extra logits processor (fair to transformers)
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == args.prompt_len + args.new

    def run_engine():
        outs = engine.generate(prompts.tolist(), sp)
        assert all(len(o[0].response_ids) == args.new for o in outs)

    run_engine()  # warm-up (rope tables, allocator), both sides
    run_hf()
    t_hf, t_eng = _best_of_interleaved(run_hf, run_engine, args.repeats)
    print(f"decode  batch={args.batch} new={args.new} family={args.family} threads={torch.get_num_threads()}")
    print(f"  transformers generate: {num_tokens / t_hf:10.0f} tok/s ({t_hf:.2f} s)")
    print(f"  embedded engine      : {num_tokens / t_eng:10.0f} tok/s ({t_eng:.2f} s)")
    print(f"  speed-up             : {t_hf / t_eng:.2f}x (target >= 2x)")

    seqs = torch.cat([prompts, torch.randint(2, hf.config.vocab_size, (args.batch, args.new), generator=g)], 1)
    starts = [args.prompt_len] * args.batch
    scored = args.batch * args.new

    def run_hf_score():
        with torch.inference_mode():
            lp = hf(seqs).logits[:, args.prompt_len - 1:-1].float().log_softmax(-1)
            lp.gather(-1, seqs[:, args.prompt_len:, None]).squeeze(-1).tolist()

    def run_engine_score():
        engine.score(seqs.tolist(), starts)

    run_engine_score()
    s_hf, s_eng = _best_of_interleaved(run_hf_score, run_engine_score, args.repeats + 3)
    print(f"score   batch={args.batch} seq_len={seqs.shape[1]} response tokens={scored}")
    print(f"  transformers forward : {scored / s_hf:10.0f} tok/s ({s_hf:.3f} s)")
    print(f"  embedded engine score: {scored / s_eng:10.0f} tok/s ({s_eng:.3f} s)")
    print(f"  speed-up             : {s_hf / s_eng:.2f}x (target >= 1x)")


if __name__ == "__main__":
    main()
