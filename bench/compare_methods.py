"""Method comparison: RLAD against GRPO, KDRL, on-policy distillation, offline distillation and two RLAD
controls, from the same teacher, student initialisations, data and sample budget, with paired statistics.

  OMP_NUM_THREADS=1 .venv/bin/python -m bench.compare_methods --workers 2     # everything, resumable
  .venv/bin/python -m bench.compare_methods --report                        # tables + plots from results

One command runs the whole plan as jobs with dependencies; `--workers N` processes share it by claiming
jobs with lock files (a lock whose process died is taken over), so the command can be killed and rerun:
  teacher                  SFT teacher; its held-out avg@k at T=1 must reach the bar (reported)
  student_init<i>          segmented SFT of student initialisation i: RL start = first segment at
                           accuracy >= 0.2 (weak but learnable), ceiling = best accuracy (ceiling check)
  pilot_lr<lr>             GRPO, init 1, seed 1, `pilot_steps` steps at each candidate lr
  run <method> init<i> seed<s>   every method x init x seed at the lr the pilot chose (frozen for all)
Each job writes ONE small JSON under `<results>` (committed: bench/comparison_results/<size>/), so
`--report` rebuilds every table and plot from the repository; models and run folders live under
`<work>` (not committed). Methods, the lr rule and the statistics: docs/method_comparison.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench import comparison_stats as st
from bench.comparison_setup import REPO, ModelShape, Setup, build_student, build_teacher, common_overrides, write_atomic

RESULTS = REPO / "bench" / "comparison_results"
WORK = REPO / "bench" / "results" / "compare_work"


@dataclass(frozen=True)
class Size:
    setup: Setup
    inits: tuple[int, ...]
    seeds: tuple[int, ...]
    num_steps: int
    prompts_per_step: int
    group_size: int
    num_minibatches: int
    ppo_epochs: int
    max_resample_rounds: int
    eval_interval: int
    last_evals: int
    pilot_lrs: tuple[float, ...]
    pilot_steps: int
    warmup_steps: int = 5
    eval_temperatures: tuple[float, float] = (1.0, 0.6)
    """The first is the rollout temperature (primary metric), then the extra eval temperature."""


SIZES: dict[str, Size] = {
    # 2 inits x 5 seeds x 7 methods = 70 runs of 50 steps, 256 responses per step (16 prompts x 16), 4 updates
    # per batch. Time on a 2-core machine estimated (not measured whole) in docs/method_comparison.md.
    "full": Size(
        setup=Setup(),
        inits=(1, 2),
        seeds=(1, 2, 3, 4, 5),
        num_steps=50,
        prompts_per_step=16,
        group_size=16,
        num_minibatches=2,
        ppo_epochs=2,
        max_resample_rounds=2,
        eval_interval=10,
        last_evals=3,
        pilot_lrs=(2e-4, 5e-4, 1e-3),
        pilot_steps=20,
    ),
    # Seconds to a few minutes: the end-to-end smoke run of every job kind (numbers mean nothing).
    "tiny": Size(
        setup=Setup(
            num_train=64,
            num_test=4,
            max_new_tokens=8,
            eval_k=2,
            teacher=ModelShape(16, 32, 1),
            teacher_sft_steps=2,
            student=ModelShape(16, 32, 1),
            student_segment_steps=1,
            student_ceiling_steps=2,
        ),
        inits=(1, 2),
        seeds=(1, 2),
        num_steps=2,
        prompts_per_step=2,
        group_size=2,
        num_minibatches=1,
        ppo_epochs=2,
        max_resample_rounds=1,
        eval_interval=1,
        last_evals=2,
        pilot_lrs=(1e-3, 2e-3),
        pilot_steps=2,
        warmup_steps=0,
    ),
}

METHODS = ("grpo", "kdrl", "opd", "sft_offline", "rlad", "rlad_self_teacher", "rlad_one_update")
"""rlad_self_teacher: teacher = the initial student (an anchor with no teacher knowledge);
rlad_one_update: one optimizer step per batch, so lp = lp_old at the update and the clip never binds."""
REWARD_DRIVEN = {"grpo", "kdrl", "rlad", "rlad_self_teacher", "rlad_one_update"}


def method_overrides(method: str, size: Size) -> list[str]:
    """Config overrides of one method. KDRL's beta is 0.05 (25x the paper's 2e-3) because these runs are far
    shorter: with 2e-3 the KD term stays negligible next to the policy gradient."""
    rlad = ["algorithm.name=rlad", "algorithm.alpha=0.5"]
    table = {
        "grpo": ["algorithm.name=grpo"],
        "kdrl": ["algorithm.name=kdrl", "algorithm.kd_schedule=constant", "algorithm.kd_coef=0.05"],
        "opd": ["algorithm.name=opd"],
        # the same prompts and group_size teacher generations per step; only the correct ones are trained on
        "sft_offline": ["algorithm.name=sft", "train.offline_source=teacher"],
        "rlad": rlad,
        "rlad_self_teacher": rlad,  # model.teacher is set by run_overrides
        "rlad_one_update": rlad + ["train.ppo_epochs=1", "train.num_minibatches=1"],
    }
    if method not in table:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(table)}")
    dynamic = (
        ["algorithm.dynamic_sampling=true", f"algorithm.max_resample_rounds={size.max_resample_rounds}"]
        if method in REWARD_DRIVEN
        else []
    )
    return list(table[method]) + dynamic


# ----------------------------------------------------------------------------- jobs
@dataclass(frozen=True)
class Job:
    kind: str  # teacher | student | pilot | run
    method: str = ""
    init: int = 0
    seed: int = 0
    lr: float = 0.0

    @property
    def key(self) -> str:
        if self.kind == "teacher":
            return "setup/teacher"
        if self.kind == "student":
            return f"setup/student_init{self.init}"
        if self.kind == "pilot":
            return f"pilot/lr{self.lr:g}"
        return f"runs/{self.method}/init{self.init}_seed{self.seed}"

    def deps(self, size: Size) -> list[Job]:
        if self.kind in ("teacher", "student"):
            return []
        if self.kind == "pilot":
            return [Job("teacher"), Job("student", init=size.inits[0])]
        return [Job("teacher"), Job("student", init=self.init)] + pilot_jobs(size)


def pilot_jobs(size: Size) -> list[Job]:
    return [Job("pilot", lr=lr) for lr in size.pilot_lrs]


def plan(size: Size, methods: Sequence[str] = METHODS) -> list[Job]:
    """Set-up first, then seed-major runs: if the plan is cut short every method has the same pairs."""
    jobs = [Job("teacher")] + [Job("student", init=i) for i in size.inits] + pilot_jobs(size)
    jobs += [Job("run", m, i, s) for s in size.seeds for i in size.inits for m in methods]
    return jobs


def result_path(results: Path, job: Job) -> Path:
    return results / f"{job.key}.json"


def is_done(job: Job, results: Path, work: Path) -> bool:
    if not result_path(results, job).exists():
        return False
    if job.kind == "teacher":  # the runs need the model itself, not only its record
        return (work / "teacher" / "config.json").exists()
    if job.kind == "student":
        return (work / f"student_init{job.init}" / "start" / "config.json").exists()
    return True


# ----------------------------------------------------------------------------- the lr rule
def chosen_lr(size: Size, results: Path) -> dict:
    pilots = [json.loads(result_path(results, j).read_text()) for j in pilot_jobs(size)]
    return st.choose_lr(pilots)


# ----------------------------------------------------------------------------- running one job
TRAIN_KEYS = (
    "reward/mean",
    "accuracy",
    "clip_frac_high",
    "clip_frac_low",
    "clip_differs_from_grpo_frac",
    "bound_moved_frac",
    "clamp_active_frac",
    "zero_adv_group_frac",
    "dynamic_sampling/kept_frac",
    "dynamic_sampling/extra_prompts",
    "num_samples",
    "optimizer_steps",
    "kl/old_vs_teacher_k1",
    "time/step",
)
"""What a committed results file keeps of each training step (the full metrics stay in the work folder)."""


def _small(rows: list[dict], keys: Sequence[str] | None) -> list[dict]:
    """Rows with only `keys` (all when None) and floats rounded to 5 significant digits."""
    out = []
    for row in rows:
        kept = {k: v for k, v in row.items() if keys is None or k in keys or k == "step"}
        out.append({k: (float(f"{v:.5g}") if isinstance(v, float) else v) for k, v in kept.items() if k != "kind"})
    return out


def train_overrides(size: Size, work: Path, init: int, seed: int, lr: float, run_dir: Path, steps: int) -> list[str]:
    setup = size.setup
    t_roll, *t_extra = size.eval_temperatures
    return common_overrides(setup, work / "train.jsonl", work / "test.jsonl") + [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"model.student={work / f'student_init{init}' / 'start'}",
        f"model.teacher={work / 'teacher'}",
        f"algorithm.group_size={size.group_size}",
        f"train.num_steps={steps}",
        f"train.prompts_per_step={size.prompts_per_step}",
        f"train.num_minibatches={size.num_minibatches}",
        f"train.ppo_epochs={size.ppo_epochs}",
        f"train.lr={lr}",
        "train.lr_decay_style=constant",
        f"train.lr_warmup_steps={size.warmup_steps}",
        "checkpoint.interval=0",
        "checkpoint.save_hf=false",
        f"eval.interval={size.eval_interval}",
        f"eval.num_samples={setup.eval_k}",
        f"rollout.temperature={t_roll}",
        f"eval.temperature={t_roll}",
        f"eval.extra_temperatures=[{','.join(str(t) for t in t_extra)}]",
    ]


def run_overrides(job: Job, size: Size, work: Path, lr: float, run_dir: Path) -> list[str]:
    overrides = train_overrides(size, work, job.init, job.seed, lr, run_dir, size.num_steps)
    overrides += method_overrides(job.method, size)
    if job.method == "rlad_self_teacher":
        overrides.append(f"model.teacher={work / f'student_init{job.init}' / 'start'}")
    return overrides


def _train(overrides: list[str], run_dir: Path) -> tuple[list[dict], float]:
    from rlad_megatron.config import load_config
    from rlad_megatron.observe import read_metrics
    from rlad_megatron.train import train

    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt: start over
    started = time.time()
    train(load_config(None, overrides), resume=False)
    rows = read_metrics(run_dir)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return rows, time.time() - started


def run_job(job: Job, size: Size, results: Path, work: Path) -> None:
    if job.kind == "teacher":
        build_teacher(size.setup, work, results / "setup")
        return
    if job.kind == "student":
        build_student(size.setup, job.init, work, results / "setup")
        return
    run_dir = work / "runs" / job.key
    if job.kind == "pilot":
        overrides = train_overrides(size, work, size.inits[0], 1, job.lr, run_dir, size.pilot_steps)
        overrides += method_overrides("grpo", size) + ["eval.interval=0", "eval.max_prompts=1"]
        rows, wall = _train(overrides, run_dir)
        result = {"lr": job.lr, "wall_s": wall, "train": _small([r for r in rows if r.get("kind") == "train"], None)}
    else:
        lr = chosen_lr(size, results)["lr"]
        overrides = run_overrides(job, size, work, lr, run_dir)
        rows, wall = _train(overrides, run_dir)
        result = {
            "spec": {"method": job.method, "init": job.init, "seed": job.seed},
            "lr": lr,
            "overrides": [o.replace(str(work), "<work>") for o in overrides],
            "wall_s": round(wall, 1),
            "eval": _small([r for r in rows if r.get("kind") == "eval"], None),
            "train": _small([r for r in rows if r.get("kind") == "train"], TRAIN_KEYS),
        }
    write_atomic(result_path(results, job), json.dumps(result, separators=(",", ":")))


# ----------------------------------------------------------------------------- workers
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(lock: Path) -> bool:
    """Take a job: create its lock exclusively, or take over a lock whose process is gone."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and _alive(holder):
                return False
            lock.unlink(missing_ok=True)
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def _held(lock: Path) -> bool:
    try:
        pid = int(lock.read_text() or "0")
    except (OSError, ValueError):
        return False
    return pid > 0 and _alive(pid)


def _lock(work: Path, job: Job) -> Path:
    return work / "locks" / (job.key.replace("/", "__") + ".lock")


def worker(size: Size, results: Path, work: Path, methods: Sequence[str] = METHODS, poll_s: float = 5.0) -> int:
    """Run claimable jobs (dependencies done, no live lock) until none is left; wait while others hold the
    jobs we depend on. A failed job is not retried by this worker (rerun the command to retry it)."""
    warnings.filterwarnings("ignore")
    jobs, failed, done = plan(size, methods), set(), 0
    while True:
        pending = [j for j in jobs if not is_done(j, results, work)]
        if not pending:
            break
        startable = [j for j in pending if j.key not in failed and not any(d.key in failed for d in j.deps(size))]
        ready = [j for j in startable if all(is_done(d, results, work) for d in j.deps(size))]
        job = next((j for j in ready if claim(_lock(work, j))), None)
        if job is None:
            if any(_held(_lock(work, j)) for j in pending):  # another worker is on it: wait for what it unblocks
                time.sleep(poll_s)
                continue
            break
        try:
            if not is_done(job, results, work):  # finished by another worker between our check and our claim
                print(f"[{time.strftime('%H:%M:%S')}] {job.key}", flush=True)
                run_job(job, size, results, work)
                done += 1
        except Exception as err:  # noqa: BLE001 - one broken job must not stop the others; retried on rerun
            print(f"FAILED {job.key}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            failed.add(job.key)
        finally:
            _lock(work, job).unlink(missing_ok=True)
    left = [j.key for j in jobs if not is_done(j, results, work)]
    print(f"worker {os.getpid()}: {done} job(s) done, {len(failed)} failed, {len(left)} not done", flush=True)
    return 1 if left else 0


def resolve_size(name: str, changes: Sequence[str] = ()) -> Size:
    """SIZES[name] with `field=value` changes (e.g. num_steps=80, seeds=1,2,3) for scaling."""
    size = SIZES[name]
    for change in changes:
        key, _, value = change.partition("=")
        if key not in Size.__dataclass_fields__ or key == "setup" or not value:
            raise ValueError(
                f"--change {change!r}: expected field=value with field one of "
                f"{sorted(k for k in Size.__dataclass_fields__ if k != 'setup')}"
            )
        old = getattr(size, key)
        new = tuple(type(old[0])(v) for v in value.split(",")) if isinstance(old, tuple) else type(old)(value)
        size = replace(size, **{key: new})
    return size


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--results", type=Path, default=RESULTS, help="per-job JSON root (one folder per size inside)")
    ap.add_argument("--work", type=Path, default=WORK, help="models and run folders (one folder per size inside)")
    ap.add_argument("--workers", type=int, default=2, help="parallel training processes")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="run only these methods")
    ap.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE", help="change a size field")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only rebuild tables and plots from the results")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "method_comparison.md", help="doc to splice into")
    ap.add_argument(
        "--img", type=Path, default=None, help="plot folder (default: <doc folder>/img/<doc name without .md>)"
    )
    args = ap.parse_args(argv)
    size = resolve_size(args.size, args.change)
    results, work = args.results / args.size, args.work / args.size
    if args.worker:
        return worker(size, results, work, args.methods)
    if not args.report:
        if args.workers > 1:
            cmd = [
                sys.executable,
                "-m",
                "bench.compare_methods",
                "--worker",
                "--size",
                args.size,
                "--results",
                str(args.results),
            ]
            cmd += ["--work", str(args.work), "--methods", *args.methods] + [f"--change={c}" for c in args.change]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            procs = [subprocess.Popen(cmd, env=env, cwd=REPO) for _ in range(args.workers)]
            status = max(p.wait() for p in procs)
        else:
            status = worker(size, results, work, args.methods)
        if status:
            print("some jobs did not finish; rerun the same command to retry them", file=sys.stderr)
    from bench.comparison_report import write_report

    write_report(
        results,
        size,
        args.size,
        args.doc,
        args.img or args.doc.parent / "img" / args.doc.stem,
        _report_command(args),
    )
    return 0


def _report_command(args: argparse.Namespace) -> str:
    """The command that rebuilds this report, with the flags that differ from the defaults."""

    def rel(path: Path) -> str:
        path = path.resolve()
        return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)

    parts = ["python -m bench.compare_methods", f"--size {args.size}"]
    if args.results.resolve() != RESULTS:
        parts.append(f"--results {rel(args.results)}")
    if args.doc.resolve() != REPO / "docs" / "method_comparison.md":
        parts.append(f"--doc {rel(args.doc)}")
    if args.img is not None:
        parts.append(f"--img {rel(args.img)}")
    return " ".join(parts + ["--report"])


if __name__ == "__main__":
    sys.exit(main())
