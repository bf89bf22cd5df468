"""Off-policy overlap: training steps per second with `train.max_staleness=1` against the synchronous loop.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_async_overlap [--steps 8] [--repeats 3]
     [--engine serve|embedded] [--hidden 384] [--json out.json]

The same RLAD run (small Llama student, same prompts, group size and seed; `rollout.ignore_eos` so every
response is exactly max_new_tokens long and every step of both modes does the same work; a teacher that
costs as much as generation without using this machine's cores: a tiny embedded teacher's real scores, then
a wait per scored token, as a teacher fleet on GPUs of its own; `--teacher-ms-per-token 0` for GRPO without
a teacher) twice per repeat,
alternating `train.max_staleness=0` and `=1` so a burst of load on a shared machine hits both. The setting
is the rehearsal's: the rollout engine is an `rlad serve` process (one torch thread) that receives the
weights over the wire after every step (`rollout.sync=distributed`), the trainer is this process (one torch
thread). The default sizes make generation and the optimizer phase cost the same order on an idle machine,
with enough arithmetic per op that the trainer's matmuls (which release the GIL) dominate its Python
overhead; the printed phase table says how the step split. At much smaller sizes (`--hidden 128`) the
trainer is bound by Python dispatch, and its rollout-client thread and its training thread take turns on
the GIL: the overlap then gains nothing, which says nothing about a cluster. `--engine embedded` keeps the
engine in the trainer's process: both halves then share one process's GIL and the overlap can only use the
spare core.

Measured per run: steps per second between the end of step 1 and the end of the last step (wall clock, every
phase included: generation or the wait for it, log-probs, optimizer step, weight sync, logging). Printed:
the median steps/s of each mode over the repeats, their ratio (target >= 1.3x), and the synchronous run's
phase balance (generate vs log-probs + train).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.bench_stream_scoring import RemoteTeacher

TARGET = 1.3
PHASES = ("generate", "score", "logprobs+train", "prefetch_wait", "sync", "step")
"""Median seconds per step of each mode (`time/...` metrics; `generate` is only the wait with max_staleness=1)."""


def _models(root: Path, hidden: int) -> tuple[Path, Path]:
    """The student, and a tiny teacher (same tokenizer) whose own arithmetic is small beside the student's."""
    from rlad_megatron.tiny_models import save_tiny_model

    size = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_key_value_heads=2)
    student = save_tiny_model(root / "student", "llama", seed=1, num_hidden_layers=4, **size)
    teacher = save_tiny_model(root / "teacher", "llama", seed=2, **dict(size, hidden_size=64, intermediate_size=128))
    return student, teacher


class WaitingTeacher(RemoteTeacher):
    """The embedded teacher's real scores, then a wait per scored token (a teacher fleet on its own GPUs: it
    costs the step time, not the trainer's CPU); every other engine call goes to the embedded engine."""

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


def _config(models: tuple[Path, Path], run_dir: Path, staleness: int, rollout: list[str], args):
    from rlad_megatron.config import load_config

    student, teacher = models
    with_teacher = [f"model.teacher={teacher}", "teacher.kind=embedded"] if args.teacher_ms_per_token else []
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "seed=5",
            f"model.student={student}",
            f"algorithm.name={'rlad' if args.teacher_ms_per_token else 'grpo'}",
            *with_teacher,
            f"algorithm.group_size={args.group_size}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            "data.train=task:addition",
            "data.task_kwargs.size=64",
            f"train.num_steps={args.steps}",
            f"train.prompts_per_step={args.prompts}",
            "train.lr=0.001",
            f"train.ppo_epochs={args.ppo_epochs}",
            "rollout.ignore_eos=true",  # every response max_new_tokens long: every step of both modes costs the same
            f"train.max_staleness={staleness}",
            "checkpoint.interval=0",
            "checkpoint.save_hf=false",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            *rollout,
        ],
    )


def _run(cfg, teacher_s_per_token: float) -> tuple[float, list[dict[str, float]]]:
    """(steps per second after step 1, metric rows): the clock is read as each step is logged."""
    from rlad_megatron import components, observe
    from rlad_megatron.train import train

    stamps: list[float] = []
    original, build_engine = observe.Observer.log_step, components.build_engine

    def log_step(self, step, metrics):
        stamps.append(time.perf_counter())
        return original(self, step, metrics)

    def build_waiting_teacher(engine_cfg, model_dir, role, *args, **kwargs):
        engine = build_engine(engine_cfg, model_dir, role, *args, **kwargs)
        return WaitingTeacher(engine, teacher_s_per_token) if role == "teacher" else engine

    observe.Observer.log_step = log_step
    components.build_engine = build_waiting_teacher
    try:
        rows = train(cfg, resume=False)
    finally:
        observe.Observer.log_step, components.build_engine = original, build_engine
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), rows


def measure(args, root: Path) -> dict:
    from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet

    models = _models(root, args.hidden)
    student = models[0]
    procs = []
    if args.engine == "serve":
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = launch_fleet([embedded_server_cmd(str(student), port, threads=1)], [url], str(root / "logs"), env=env)
        rollout = [
            "rollout.kind=http",
            f"rollout.urls=[{url}]",
            "rollout.sync=distributed",
            "rollout.sync_host=127.0.0.1",
        ]
    else:
        rollout = ["rollout.kind=embedded"]
    speeds: dict[int, list[float]] = {0: [], 1: []}
    phases: dict[int, dict[str, list[float]]] = {0: {p: [] for p in PHASES}, 1: {p: [] for p in PHASES}}
    try:
        for rep in range(args.repeats):
            for staleness in (0, 1):
                cfg = _config(models, root / f"run_{rep}_{staleness}", staleness, rollout, args)
                steps_per_s, rows = _run(cfg, args.teacher_ms_per_token / 1000)
                speeds[staleness].append(steps_per_s)
                print(f"repeat {rep} max_staleness={staleness}: {steps_per_s:.3f} steps/s", flush=True)
                for r in rows[1:-1]:  # the last step has no next step to wait for
                    for phase in PHASES:
                        phases[staleness][phase].append(sum(r.get(f"time/{part}", 0.0) for part in phase.split("+")))
    finally:
        for p in procs:
            p.stop(grace_s=5)
    sync_s, async_s = statistics.median(speeds[0]), statistics.median(speeds[1])
    return {
        "steps_per_s": {"sync": sync_s, "async": async_s},
        "all_steps_per_s": {"sync": speeds[0], "async": speeds[1]},
        "speedup": async_s / sync_s,
        "phases_s": {mode: {k: statistics.median(v) for k, v in by.items()} for mode, by in phases.items()},
        "samples_per_step": args.prompts * args.group_size,
        "engine": args.engine,
        "teacher_ms_per_token": args.teacher_ms_per_token,
    }


def table(stats: dict) -> list[str]:
    p = {int(mode): v for mode, v in stats["phases_s"].items()}
    engine = "`rlad serve` process (weights over the wire)" if stats["engine"] == "serve" else "embedded, in-process"
    return [
        f"Rollout engine: {engine}; {stats['samples_per_step']} samples per step in both modes; "
        + (
            f"RLAD with a teacher waiting {stats['teacher_ms_per_token']} ms per scored token."
            if stats["teacher_ms_per_token"]
            else "GRPO, no teacher."
        ),
        "",
        "| mode | steps/s (median) | runs |",
        "|---|---:|---|",
        f"| `train.max_staleness=0` | {stats['steps_per_s']['sync']:.3f} | "
        + ", ".join(f"{v:.3f}" for v in stats["all_steps_per_s"]["sync"])
        + " |",
        f"| `train.max_staleness=1` | {stats['steps_per_s']['async']:.3f} | "
        + ", ".join(f"{v:.3f}" for v in stats["all_steps_per_s"]["async"])
        + " |",
        "",
        "| median s per step | " + " | ".join(PHASES) + " |",
        "|---|" + "---:|" * len(PHASES),
        *(f"| `max_staleness={m}` | " + " | ".join(f"{p[m][k]:.2f}" for k in PHASES) + " |" for m in (0, 1)),
        "",
        f"Speed-up max_staleness=1 vs 0: {stats['speedup']:.2f}x (target >= {TARGET:.1f}x).",
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="steps per run (the rate is taken after step 1)")
    ap.add_argument("--repeats", type=int, default=3, help="sync / async run pairs")
    ap.add_argument("--engine", choices=("serve", "embedded"), default="serve")
    ap.add_argument(
        "--teacher-ms-per-token",
        type=float,
        default=0.6,
        help="RLAD with a teacher that waits this long per scored token (0: GRPO, no teacher)",
    )
    ap.add_argument("--hidden", type=int, default=384, help="student hidden size (4 layers, FFN 2x hidden)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=80, help="every response's length (rollout.ignore_eos)")
    ap.add_argument("--ppo-epochs", type=int, default=1, help="optimizer passes per step (sets the train cost)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the rate is taken between the end of step 1 and the last step)")
    warnings.filterwarnings("ignore")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        stats = measure(args, Path(tmp))
    lines = table(stats)
    print("\n".join(lines) + f" [{time.time() - started:.0f} s]")
    if args.json:
        args.json.write_text(json.dumps({**stats, "target": TARGET, "table": lines}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
