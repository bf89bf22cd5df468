"""`rlad`: one console script, one subcommand per job.

Each subcommand lives in the package that owns it and exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their subcommand runs, so `rlad --help`
stays fast and never imports Megatron.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("rlad_megatron.train_cli", "train a student (RLAD, GRPO, KDRL, OPD, GKD, SFT) from a recipe"),
    "eval": ("rlad_megatron.eval.cli", "avg@k / pass@k of a checkpoint on a dataset or task"),
    "convert": ("rlad_megatron.conversion.cli", "convert checkpoints between Hugging Face and Megatron formats"),
    "serve": (
        "rlad_megatron.engines.server",
        "serve a HF checkpoint over SGLang's native HTTP API (embedded engine)",
    ),
    "plan": ("rlad_megatron.launch.plan", "memory and time plan of a recipe on a GPU cluster"),
    "render": ("rlad_megatron.launch.render", "render the sbatch job of a recipe (DRY_RUN prints the topology)"),
    "rehearse": ("rlad_megatron.launch.rehearse", "run a recipe's job on this machine: tiny models, loopback nodes"),
    "report": ("rlad_megatron.report", "plots and a markdown table comparing run folders"),
}


def _load(name: str):
    return importlib.import_module(COMMANDS[name][0])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlad", description="RL-aware knowledge distillation on Megatron-Core.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=help_text)
        if name in sys.argv[1:2]:
            _load(name).add_arguments(sub)
        sub.set_defaults(_command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0]] + argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may come anywhere, also after options (argparse alone stops collecting a
    # positional list at the first option): hand any leftover KEY=VALUE to the command's overrides.
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides.extend(extra)
    elif extra:  # a command may add why, e.g. `rlad serve` refusing an SGLang flag it cannot honour
        parser.error(f"unrecognized arguments: {' '.join(extra)}{getattr(args, 'unrecognized_hint', '')}")
    if not getattr(args, "_command", None):
        parser.print_help()
        return 2
    return int(_load(args._command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
