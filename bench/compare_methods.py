"""Method comparison: GRPO, KDRL (constant / annealed), on-policy distillation, offline distillation and
RLAD from the same student, teacher, data, step and sample budget, over several seeds and two tasks.

  OMP_NUM_THREADS=1 .venv/bin/python bench/compare_methods.py --size small --workers 2   # train (resumable)
  .venv/bin/python bench/compare_methods.py --size small --report                        # tables + plots only

Each run trains in-process with `rlad_megatron.train.train` and writes ONE results file
`<out>/<size>/<task>/<method>/seed<k>.json` (eval curve, per-step metrics, phase times, wall time);
rerunning skips finished runs, and `--workers N` processes share the plan by claiming runs with
lock files (a lock whose process died is taken over), so the command can be killed and restarted.
Groups of runs: `main` (every method on every task), `ablation` (RLAD alpha 0.1..0.9 on the first
task; alpha 1.0 is GRPO) and `explain` (clamp mode live vs detached, dynamic sampling for GRPO and
RLAD, RLAD with the untrained student-sized teacher). Sizes and how to scale up: SIZES below and
docs/method_comparison.md. Left out: GKD top-k (not asked for by the comparison; one override away).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison_setup import REPO, ModelShape, Setup, common_overrides, prepare

DEFAULT_OUT = REPO / "bench" / "results" / "compare"


@dataclass(frozen=True)
class Size:
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    num_steps: int
    prompts_per_step: int
    group_size: int
    eval_interval: int
    eval_k: int
    lr: float
    setup: Setup
    num_minibatches: int = 1
    ablation_seeds: tuple[int, ...] = ()
    explain_seeds: tuple[int, ...] = ()


_SMALL_SETUP = Setup(
    task="",
    num_test=96,
    teacher=ModelShape(64, 192, 2),
    student=ModelShape(32, 96, 2),
    teacher_sft_steps=2000,
    student_sft_steps=800,
)
SIZES: dict[str, Size] = {
    # ~20 min for the 63 runs with --workers 2 (measured on this 2-core machine while shared), + ~5 min set-up.
    "small": Size(
        tasks=("addition", "multiplication"),
        seeds=(1, 2, 3),
        num_steps=50,
        prompts_per_step=16,
        group_size=8,
        eval_interval=5,
        eval_k=4,
        lr=1e-4,
        num_minibatches=4,
        setup=_SMALL_SETUP,
        ablation_seeds=(1, 2, 3),
        explain_seeds=(1, 2, 3),
    ),
    # The size (~90 min on 2 quiet cores, estimated from the small and 100-step runs, not run):
    # twice the steps, a larger held-out set and k, 5 seeds for the main comparison.
    "full": Size(
        tasks=("addition", "multiplication"),
        seeds=(1, 2, 3, 4, 5),
        num_steps=100,
        prompts_per_step=16,
        group_size=8,
        eval_interval=10,
        eval_k=8,
        lr=1e-4,
        num_minibatches=4,
        setup=replace(_SMALL_SETUP, num_test=128),
        ablation_seeds=(1, 2, 3),
        explain_seeds=(1, 2, 3),
    ),
    # Seconds: the unit-test smoke run (one task, one seed, two methods).
    "tiny": Size(
        tasks=("addition",),
        seeds=(1,),
        num_steps=2,
        prompts_per_step=2,
        group_size=2,
        eval_interval=1,
        eval_k=2,
        lr=1e-3,
        setup=replace(
            _SMALL_SETUP, num_train=64, num_test=4, teacher_sft_steps=2, student_sft_steps=1, max_new_tokens=8
        ),
    ),
}

MAIN_METHODS = ("grpo", "kdrl_const", "kdrl_anneal", "opd", "sft_offline", "rlad")
ABLATION_ALPHAS = (0.1, 0.3, 0.7, 0.9)
EXPLAIN_METHODS = ("rlad_live", "grpo_dyn", "rlad_dyn", "rlad_weak_teacher", "rlad_clamp0.2")


def method_overrides(method: str, num_steps: int) -> list[str]:
    """Config overrides of one method. KDRL's beta is scaled up from the paper's 2e-3 because these
    runs are ~100x shorter: with 2e-3 the KD term would stay negligible next to the policy gradient."""
    if method.startswith("rlad_a"):
        return ["algorithm.name=rlad", f"algorithm.alpha={float(method[len('rlad_a') :])}"]
    table = {
        "grpo": ["algorithm.name=grpo"],
        "kdrl_const": ["algorithm.name=kdrl", "algorithm.kd_schedule=constant", "algorithm.kd_coef=0.05"],
        "kdrl_anneal": [
            "algorithm.name=kdrl",
            "algorithm.kd_schedule=annealed",
            "algorithm.kd_coef_start=0.1",
            f"algorithm.kd_coef_decay={0.09 / max(num_steps, 1):.6g}",
            "algorithm.kd_coef_min=0.01",
        ],
        "opd": ["algorithm.name=opd"],
        # Same prompts and group_size teacher generations per step as the RL methods (same sample
        # budget); only the correct ones are trained on.
        "sft_offline": ["algorithm.name=sft", "train.offline_source=teacher"],
        "rlad": ["algorithm.name=rlad", "algorithm.alpha=0.5"],
        "rlad_live": ["algorithm.name=rlad", "algorithm.alpha=0.5", "algorithm.clamp_mode=live"],
        "grpo_dyn": ["algorithm.name=grpo", "algorithm.dynamic_sampling=true", "algorithm.max_resample_rounds=2"],
        "rlad_dyn": [
            "algorithm.name=rlad",
            "algorithm.alpha=0.5",
            "algorithm.dynamic_sampling=true",
            "algorithm.max_resample_rounds=2",
        ],
        "rlad_weak_teacher": ["algorithm.name=rlad", "algorithm.alpha=0.5"],
        # |lp - lp_T| <= 0.2 keeps the teacher's factor (0.9..1.1 at alpha 0.5) inside the PPO clip range.
        "rlad_clamp0.2": ["algorithm.name=rlad", "algorithm.alpha=0.5", "algorithm.teacher_log_ratio_clamp=0.2"],
    }
    if method not in table:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(table)} or rlad_a<alpha>")
    return list(table[method])


@dataclass(frozen=True)
class RunSpec:
    group: str
    task: str
    method: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"


def plan(
    size: Size, groups: Sequence[str] = ("main", "ablation", "explain"), methods: Sequence[str] | None = None
) -> list[RunSpec]:
    """Seed-major order: if the run is cut short, every method has the same number of seeds.
    `methods` keeps only those method names."""
    specs: list[RunSpec] = []
    if "main" in groups:
        specs += [RunSpec("main", t, m, s) for s in size.seeds for t in size.tasks for m in MAIN_METHODS]
    first = size.tasks[0]
    for seed in sorted(set(size.ablation_seeds) | set(size.explain_seeds)):
        if "ablation" in groups and seed in size.ablation_seeds:
            specs += [RunSpec("ablation", first, f"rlad_a{a}", seed) for a in ABLATION_ALPHAS]
        if "explain" in groups and seed in size.explain_seeds:
            specs += [RunSpec("explain", first, m, seed) for m in EXPLAIN_METHODS]
    return [s for s in specs if methods is None or s.method in methods]


def result_path(out: Path, spec: RunSpec) -> Path:
    return out / f"{spec.key}.json"


def run_overrides(spec: RunSpec, size: Size, paths: dict[str, Path], run_dir: Path) -> list[str]:
    setup = replace(size.setup, task=spec.task)
    teacher = paths["student"] if spec.method == "rlad_weak_teacher" else paths["teacher"]
    return (
        common_overrides(setup, paths["train"], paths["test"])
        + [
            f"run_dir={run_dir}",
            f"seed={spec.seed}",
            f"model.student={paths['student']}",
            f"model.teacher={teacher}",
            f"algorithm.group_size={size.group_size}",
            f"train.num_steps={size.num_steps}",
            f"train.prompts_per_step={size.prompts_per_step}",
            f"train.lr={size.lr}",
            f"train.num_minibatches={size.num_minibatches}",
            "checkpoint.interval=0",
            "checkpoint.save_hf=false",
            f"eval.interval={size.eval_interval}",
            f"eval.num_samples={size.eval_k}",
            "rollout.temperature=1.0",
        ]
        + method_overrides(spec.method, size.num_steps)
    )


def run_one(spec: RunSpec, size: Size, paths: dict[str, Path], out: Path) -> dict:
    """Train one (task, method, seed) from scratch and write its results file atomically."""
    from rlad_megatron.config import load_config
    from rlad_megatron.observe import read_metrics
    from rlad_megatron.train import train

    run_dir = out / "runs" / spec.key
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished earlier attempt: start over
    overrides = run_overrides(spec, size, paths, run_dir)
    started = time.time()
    train(load_config(None, overrides), resume=False)
    rows = read_metrics(run_dir)
    result = {
        "spec": vars(spec),
        "overrides": overrides,
        "wall_s": time.time() - started,
        "eval": [r for r in rows if r.get("kind") == "eval"],
        "train": [r for r in rows if r.get("kind") == "train"],
    }
    path = result_path(out, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the results file is what we keep
    return result


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(lock: Path) -> bool:
    """Take a run: create its lock exclusively, or take over a lock whose process is gone."""
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


def resolve_size(name: str, changes: Sequence[str] = ()) -> Size:
    """SIZES[name] with `field=value` changes (e.g. num_steps=200, seeds=1,2,3,4,5) for scaling up."""
    size = SIZES[name]
    for change in changes:
        key, _, value = change.partition("=")
        if key not in Size.__dataclass_fields__ or key == "setup" or not value:
            raise ValueError(
                f"--change {change!r}: expected field=value with field one of "
                f"{sorted(k for k in Size.__dataclass_fields__ if k != 'setup')}"
            )
        old = getattr(size, key)
        new = (
            tuple(type(old[0] if old else "")(v) for v in value.split(","))
            if isinstance(old, tuple)
            else type(old)(value)
        )
        size = replace(size, **{key: new})
    return size


def worker(size: Size, out: Path, groups: Sequence[str], methods: Sequence[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    done = failed = 0
    for spec in plan(size, groups, methods):
        result, lock = result_path(out, spec), out / "locks" / (spec.key.replace("/", "__") + ".lock")
        if result.exists() or not claim(lock):
            continue
        try:
            if result.exists():  # finished by another worker between our check and our claim
                continue
            paths = prepare(replace(size.setup, task=spec.task), out / "setup" / spec.task)
            print(f"[{time.strftime('%H:%M:%S')}] run {spec.key}", flush=True)
            r = run_one(spec, size, paths, out)
            print(f"[{time.strftime('%H:%M:%S')}] done {spec.key} in {r['wall_s']:.0f}s", flush=True)
            done += 1
        except Exception as err:  # noqa: BLE001 - one broken run must not stop the others; retried on rerun
            print(f"FAILED {spec.key}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            failed += 1
        finally:
            lock.unlink(missing_ok=True)
    print(f"worker {os.getpid()}: {done} run(s) done, {failed} failed", flush=True)
    return 1 if failed else 0


def launch_workers(args: argparse.Namespace, out: Path) -> int:
    """Prepare every task once, then start N worker processes over the shared plan."""
    size = resolve_size(args.size, args.change)
    for task in size.tasks:
        prepare(replace(size.setup, task=task), out / "setup" / task)
    cmd = [sys.executable, __file__, "--size", args.size, "--out", str(args.out), "--worker", "--groups", *args.groups]
    cmd += ["--methods", *args.methods] if args.methods else []
    cmd += [f"--change={c}" for c in args.change]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    procs = [subprocess.Popen(cmd, env=env) for _ in range(args.workers)]
    return max(p.wait() for p in procs)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (one folder per size inside)")
    ap.add_argument("--workers", type=int, default=1, help="parallel training processes")
    ap.add_argument(
        "--groups", nargs="+", default=["main", "ablation", "explain"], choices=["main", "ablation", "explain"]
    )
    ap.add_argument("--methods", nargs="+", help="run only these methods (e.g. grpo rlad)")
    ap.add_argument(
        "--change",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a field of the size (repeatable), e.g. --change num_steps=200; use a new --out",
    )
    ap.add_argument("--tag", default="", help="name of the doc's generated block (and plot prefix) for this run")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs into tables and plots")
    ap.add_argument(
        "--doc",
        type=Path,
        default=REPO / "docs" / "method_comparison.md",
        help="markdown file whose generated-results block is rewritten by --report",
    )
    args = ap.parse_args(argv)
    out = args.out / args.size
    size = resolve_size(args.size, args.change)
    if args.worker:
        return worker(size, out, args.groups, args.methods)
    if not args.report:
        status = launch_workers(args, out) if args.workers > 1 else worker(size, out, args.groups, args.methods)
        if status:
            print("some runs failed; rerun the same command to retry them", file=sys.stderr)
    from comparison_report import write_report

    shown = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--report",))
    write_report(
        out,
        size,
        args.size,
        args.doc,
        tag=args.tag,
        command=f"OMP_NUM_THREADS=1 .venv/bin/python bench/compare_methods.py {shown}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
