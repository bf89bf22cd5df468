"""Streaming teacher scoring: how much of the teacher phase hides under generation.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_stream_scoring [--prompts 16] [--repeats 2] [--json out.json]

One step's sample collection (StudentRollouts.collect: generate, rewards, teacher scores) with a tiny
embedded student as the rollout engine (continuous batching, `max_batch_size` rows, so groups finish in
waves) and a teacher that costs as much as generation. The teacher is the embedded engine of a wider tiny
model whose every call then waits a fixed time per scored token, one call at a time: it stands for a teacher
fleet on other nodes (its time is spent elsewhere, not on this machine's two cores); the per-token cost is
calibrated in the same run so that scoring everything after generation takes as long as generation itself.

Measured per mode, alternating, median over repeats:
- generate only (the teacher off): the generation time;
- `train.stream_scoring=false`: the teacher phase after generation (`time/score_after_generate`);
- `train.stream_scoring=true`: what is left of it once generation returns.
Printed: hidden fraction = 1 - left(streaming) / teacher phase(after generation), and the step speed-up;
the two modes' samples and teacher scores are checked equal bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]

TARGET_HIDDEN = 0.70


class RemoteTeacher:
    """The embedded teacher's real scores, then `seconds_per_token` of waiting per scored token; one call at a
    time (a fleet with a fixed capacity)."""

    def __init__(self, engine, seconds_per_token: float):
        self.engine, self.seconds_per_token = engine, seconds_per_token
        self.lock = threading.Lock()
        self.tokens = 0

    def score(self, ids, starts, top_k=0):
        with self.lock:
            out = self.engine.score(ids, starts, top_k=top_k)
            tokens = sum(len(seq) for seq in ids)
            self.tokens += tokens
            time.sleep(self.seconds_per_token * tokens)
            return out


def _models(root: Path) -> tuple[Path, Path]:
    from rlad_megatron.tiny_models import save_tiny_model

    size = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    student = save_tiny_model(root / "student", "llama", seed=1, **size)
    teacher = save_tiny_model(root / "teacher", "llama", seed=2, **dict(size, hidden_size=96, intermediate_size=192))
    return student, teacher


def _ctx(student: Path, teacher_engine, rollout_engine, args, streaming: bool, needs_teacher: bool):
    from rlad_megatron.components import load_tokenizer
    from rlad_megatron.config import load_config
    from rlad_megatron.data.loader import load_prompts
    from rlad_megatron.data.sampler import PromptSampler
    from rlad_megatron.rewards.base import RewardResult
    from rlad_megatron.sample_sources import SourceContext

    cfg = load_config(
        None,
        [
            "seed=3",
            f"algorithm.group_size={args.group_size}",
            f"train.prompts_per_step={args.prompts}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"train.stream_scoring={str(streaming).lower()}",
        ],
    )
    tokenizer = load_tokenizer(str(student))
    dataset = load_prompts("task:addition", cfg.data, tokenizer, split="train", seed=cfg.seed)
    return SourceContext(
        cfg=cfg,
        objective=SimpleNamespace(uses_rewards=True, needs_teacher=needs_teacher, teacher_top_k=0),
        tokenizer=tokenizer,
        sampler=PromptSampler(dataset.records, seed=cfg.seed, shuffle=False),
        reward_fn=lambda text, record: RewardResult(float(sum(c.isdigit() for c in text)), {"correct": False}),
        rollout_engine=rollout_engine,
        teacher_engine=teacher_engine,
    )


def _collect(ctx) -> tuple[float, float, list]:
    from rlad_megatron.sample_sources import StudentRollouts

    start = time.perf_counter()
    samples, metrics = StudentRollouts().collect(ctx, step=1)
    return time.perf_counter() - start, metrics["time/score_after_generate"], samples


def table(stats: dict[str, float]) -> list[str]:
    return [
        "| mode | collect time (s) | teacher time left after generation (s) |",
        "|---|---:|---:|",
        f"| generate only (no teacher) | {stats['generate_s']:.2f} | - |",
        f"| score after generation | {stats['after_step_s']:.2f} | {stats['after_left_s']:.2f} |",
        f"| streaming scoring | {stats['stream_step_s']:.2f} | {stats['stream_left_s']:.2f} |",
        "",
        f"Teacher phase hidden by streaming: {stats['hidden_frac']:.0%} (target >= {TARGET_HIDDEN:.0%}); "
        f"collect speed-up {stats['speedup']:.2f}x; samples and teacher scores identical: {stats['identical']}.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-batch-size", type=int, default=8, help="rollout rows decoded together")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()

    from rlad_megatron.engines.embedded import EmbeddedEngine

    with tempfile.TemporaryDirectory() as tmp:
        student, teacher_dir = _models(Path(tmp))
        rollout = EmbeddedEngine(student, max_batch_size=args.max_batch_size)
        teacher = RemoteTeacher(EmbeddedEngine(teacher_dir), seconds_per_token=0.0)
        _collect(_ctx(student, teacher, rollout, args, True, True))  # warm-up; counts the scored tokens
        generate_s = statistics.median(
            _collect(_ctx(student, None, rollout, args, True, False))[0] for _ in range(args.repeats)
        )
        teacher.seconds_per_token = generate_s / max(teacher.tokens, 1)  # teacher phase ~ generation time
        runs: dict[str, list[tuple[float, float]]] = {"after": [], "stream": []}
        samples = {}
        for _ in range(args.repeats):
            for mode in ("after", "stream"):
                step_s, left_s, samples[mode] = _collect(_ctx(student, teacher, rollout, args, mode == "stream", True))
                runs[mode].append((step_s, left_s))
    identical = [s.to_dict() for s in samples["after"]] == [s.to_dict() for s in samples["stream"]]
    med = {mode: tuple(statistics.median(r[k] for r in rs) for k in (0, 1)) for mode, rs in runs.items()}
    stats = {
        "generate_s": generate_s,
        "after_step_s": med["after"][0],
        "after_left_s": med["after"][1],
        "stream_step_s": med["stream"][0],
        "stream_left_s": med["stream"][1],
        "hidden_frac": 1.0 - med["stream"][1] / max(med["after"][1], 1e-9),
        "speedup": med["after"][0] / max(med["stream"][0], 1e-9),
        "identical": identical,
        "teacher_s_per_token": teacher.seconds_per_token,
    }
    print("\n".join(table(stats)))
    print(f"hidden fraction vs scoring after generation: {stats['hidden_frac']:.2f} (target >= {TARGET_HIDDEN})")
    print(f"speed-up of collect vs scoring after generation: {stats['speedup']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"stats": stats, "target": TARGET_HIDDEN, "table": table(stats)}, indent=1))
    if not identical:
        sys.exit("streaming changed the samples or teacher scores")


if __name__ == "__main__":
    main()
