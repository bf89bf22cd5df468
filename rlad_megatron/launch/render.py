"""`rlad render RECIPE.yaml [overrides] --out job.sbatch`: the Slurm job of a recipe.

Python decides everything (node roles, GPUs, ports: `launch.topology`); the rendered script stays thin:
#SBATCH lines from `launch.*`, environment knobs with defaults, the topology as text for DRY_RUN, traps for
preemption / requeue, and one `srun --ntasks-per-node=1 python -m rlad_megatron.launch.node` line. The
template is `slurm/job.sbatch.tmpl` in the source tree (or `--template`). Placeholders are `@@NAME@@` so that
bash's own `$VARS` pass through untouched.

Left out: heterogeneous Slurm jobs (all nodes share one allocation shape) and non-GPU partitions.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from rlad_megatron.config import RunConfig, load_config, parse_overrides
from rlad_megatron.launch.topology import fingerprint, fleet_engine, fleet_names, plan_topology

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "job.sbatch.tmpl"


def sbatch_lines(cfg: RunConfig, log_dir: str) -> list[str]:
    """The #SBATCH header for `cfg.launch` (one task per node: the node agent starts the rest)."""
    la = cfg.launch
    lines = [
        f"--job-name={la.job_name}",
        f"--nodes={la.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={la.gpus_per_node}",
        "--exclusive",
        f"--time={la.time_limit}",
        f"--output={log_dir}/slurm-%j.out",
        "--signal=B:USR1@120",
        "--requeue",
        "--open-mode=append",
    ]
    if la.partition:
        lines.append(f"--partition={la.partition}")
    if la.account:
        lines.append(f"--account={la.account}")
    return [f"#SBATCH {line}" for line in lines]


def _env_lines(env: dict) -> str:
    for key in env:
        if not key.replace("_", "").isalnum() or key[0].isdigit():
            raise ValueError(f"launch.env key {key!r} is not a valid environment variable name")
    return "\n".join(f'export {k}="${{{k}:-{_dq(str(v))}}}"' for k, v in sorted(env.items()))


def _dq(text: str) -> str:
    """Escape for use inside a double-quoted bash string."""
    for ch in ("\\", '"', "$", "`"):
        text = text.replace(ch, "\\" + ch)
    return text


def _refuse_embedded_keys(cfg: RunConfig, overrides: Sequence[str]) -> None:
    """The script is a file others may read: an API key must come from the environment at run time."""
    names = {fleet_engine(cfg, f)[0].api_key_env for f in fleet_names(cfg)}
    keyed = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].strip().endswith("api_key")]
    if keyed or names & set(cfg.launch.env):
        raise ValueError(
            f"{(keyed or sorted(names & set(cfg.launch.env)))[0]} would write the API key into the "
            f"sbatch script; export {cfg.rollout.api_key_env} in the shell that runs sbatch instead"
        )


def render(cfg: RunConfig, recipe: str, overrides: Sequence[str], template: Path = DEFAULT_TEMPLATE) -> str:
    """The sbatch script text. Raises ValueError for an impossible layout (from `plan_topology`)."""
    if not template.is_file():
        raise ValueError(f"sbatch template {template} not found; run from a source checkout or pass --template")
    _refuse_embedded_keys(cfg, overrides)
    topo = plan_topology(cfg)
    recipe_path = str(Path(recipe).resolve())
    values = {
        "SBATCH": "\n".join(sbatch_lines(cfg, str(Path(cfg.run_dir).resolve() / "logs"))),
        "RECIPE": _dq(recipe_path),
        "IMAGE": _dq(cfg.launch.container_image),
        "MOUNTS": _dq(",".join(cfg.launch.container_mounts)),
        "HEALTH": str(cfg.launch.health_timeout_s),
        "ENV": _env_lines(cfg.launch.env),
        "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
        "TOPOLOGY": topo.describe(),
        "NODES": str(cfg.launch.nodes),
        "FINGERPRINT": fingerprint(topo),
    }
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@@{key}@@", value)
    if "@@" in text:
        raise ValueError(f"template {template} has an unknown placeholder near {text[text.index('@@') :][:30]!r}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (the `launch:` section sets nodes, roles, Slurm fields)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, e.g. launch.nodes=4 launch.partition=gpu (before the options, or use --set)",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another override (repeatable; may follow the options)",
    )
    parser.add_argument("--out", default="", help="write the script here (default: stdout)")
    parser.add_argument("--template", default=str(DEFAULT_TEMPLATE), help="sbatch template")


def run(args: argparse.Namespace) -> int:
    try:
        overrides = parse_overrides(args.overrides + args.set_overrides)
        cfg = load_config(args.recipe, overrides)
        text = render(cfg, args.recipe, overrides, Path(args.template))
    except ValueError as err:
        print(f"rlad render: {err}", file=sys.stderr)
        return 2
    if not args.out:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.write_text(text)
    out.chmod(0o755)
    (Path(cfg.run_dir) / "logs").mkdir(parents=True, exist_ok=True)
    print(f"wrote {out} ({cfg.launch.nodes} node(s)); check it with: DRY_RUN=1 bash {out}; submit: sbatch {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlad render")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
