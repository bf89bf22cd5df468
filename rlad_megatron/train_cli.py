"""`rlad train --config RECIPE.yaml [a.b=c ...] [--set a.b=c] [--resume | --no-resume] [--dry-run]`.

Also runnable as `python -m rlad_megatron.train_cli ...`, which is what torchrun launches for
tensor / pipeline parallel runs (`torchrun --nproc_per_node 2 -m rlad_megatron.train_cli ...`).

`--dry-run` resolves the config and checks, before any model is built, everything that would
otherwise fail minutes into a run, printing one clear message per problem (preflight.py), then the
plan; it exits 0 when the run could start and 1 otherwise. Resume is the default when the run
folder already holds a complete checkpoint; `--no-resume` refuses to mix a fresh run into it.
Debug modes come from `train.mode` (rollout_only, train_only; see docs/training.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from rlad_megatron.config import RunConfig, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="recipe YAML (see examples/*/recipe.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.num_steps=2")
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another way to give an override (repeatable)",
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="continue from the latest checkpoint in run_dir (default: yes when one exists)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve the config, check models, tokenizers, data and parallel layout, print the plan, exit",
    )


def resolve(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, list(args.overrides) + [o for o in args.set_overrides])


def plan_text(cfg: RunConfig, objective=None) -> str:
    """The human-readable plan printed by --dry-run and at the start of a run."""
    a, t = cfg.algorithm, cfg.train
    from rlad_megatron.preflight import required_models

    needs_teacher = "teacher" in required_models(cfg, objective) if objective is not None else bool(cfg.model.teacher)
    lines = [
        f"run_dir          {cfg.run_dir}",
        f"algorithm        {a.name} (group_size={a.group_size}, clip={a.clip_low}/{a.clip_high}, alpha={a.alpha})",
        f"student          {cfg.model.student}",
        f"teacher          {_teachers_text(cfg) if needs_teacher else '(not used)'}",
        f"data             train={cfg.data.train} eval={cfg.data.eval or '(none)'}",
        f"reward           {cfg.reward.name}",
        (
            f"steps            {t.num_steps} x {t.prompts_per_step} prompts x {a.group_size} responses "
            f"= {t.prompts_per_step * a.group_size} samples/step; {t.ppo_epochs} epoch(s) x {t.num_minibatches} minibatch(es)"
        ),
        f"optimizer        lr={t.lr} ({t.lr_decay_style}, warmup {t.lr_warmup_steps}) clip_grad={t.clip_grad}",
        (
            f"parallel         TP={cfg.parallel.tensor_model_parallel_size} PP={cfg.parallel.pipeline_model_parallel_size} "
            f"SP={cfg.parallel.sequence_parallel} dist_opt={cfg.parallel.use_distributed_optimizer}"
        ),
        (
            f"engines          rollout={cfg.rollout.kind} teacher={_teacher_kinds(cfg) if needs_teacher else '-'} "
            f"max_new_tokens={cfg.rollout.max_new_tokens} T={cfg.rollout.temperature}"
        ),
        (
            f"mode             {t.mode}; checkpoint every {cfg.checkpoint.interval or 'end only'}; "
            + (
                f"eval every {cfg.eval.interval}"
                if cfg.data.eval and cfg.eval.interval
                else "no eval (" + ("eval.interval=0" if cfg.data.eval else "data.eval empty") + ")"
            )
        ),
        f"resume           {_resume_text(cfg)}",
    ]
    return "\n".join(lines)


def _teachers_text(cfg: RunConfig) -> str:
    if not cfg.teachers:
        return cfg.model.teacher
    default = f", default {cfg.data.teacher_default}" if cfg.data.teacher_default else ""
    named = ", ".join(f"{name}={t.model}" for name, t in cfg.teachers.items())
    return f"{named} (by row field {cfg.data.teacher_field or '-'}{default})"


def _teacher_kinds(cfg: RunConfig) -> str:
    return ",".join(f"{name}:{t.kind}" for name, t in cfg.teachers.items()) if cfg.teachers else cfg.teacher.kind


def _resume_text(cfg: RunConfig) -> str:
    from rlad_megatron.backends.megatron.checkpoint import latest_checkpoint

    latest = latest_checkpoint(cfg.run_dir)
    return f"continues from {latest}" if latest else "no checkpoint yet: starts at step 0"


def dry_run(cfg: RunConfig) -> int:
    from rlad_megatron.preflight import preflight

    problems, objective = preflight(cfg)
    print(plan_text(cfg, objective))
    if problems:
        print(f"\ndry run found {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\ndry run: OK (config, models, tokenizers, data and parallel layout checked)")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        cfg = resolve(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"rlad train: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(cfg)
    # Megatron warns once per module that Transformer Engine / apex are absent: expected on CPU.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.train import ResumeError, TrainingStopped, train

    if os.environ.get("RANK", "0") == "0":
        print(plan_text(cfg, build_objective(cfg.algorithm)), flush=True)
    try:
        train(cfg, resume=args.resume)
    except TrainingStopped as err:
        print(f"rlad train: stopped: {err}", file=sys.stderr)
        return 3
    except ResumeError as err:
        print(f"rlad train: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlad train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
