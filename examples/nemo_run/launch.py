"""The RLAD job through nemo-run: the same node agent as the sbatch script, on Slurm or locally.

    # Slurm (print the sbatch nemo-run would submit; drop --dryrun and add --ssh-host to submit over SSH)
    python examples/nemo_run/launch.py slurm examples/qwen3_math/recipe.yaml --dryrun
    # CPU, through nemo-run's LocalExecutor: the capacity plan of a recipe, or the CPU demo in reduced size
    python examples/nemo_run/launch.py plan-local examples/qwen3_math/recipe.yaml --out plan.json
    python examples/nemo_run/launch.py demo-local

On Slurm every node runs `python -m rlad_megatron.launch.node RECIPE [overrides]` (one task per node), which
picks its role from the recipe's `launch` section, exactly as the rendered sbatch does. nemo-run supplies the
#SBATCH header, the container flags and the log folders; `SIGUSR1` 120 s before the time limit reaches the node
agents, which stop the trainer and servers cleanly (the next run resumes from the checkpoint in run_dir).
The job runs in nemo-run's code folder (`<job_dir>/code`, `/nemo_run/code` in the container), where a path
on this machine means nothing, so the recipe file is packaged into that folder and passed by its name. The
code itself is expected inside the container image (see the Dockerfile); --git-package ships the current
commit into the code folder as well.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import nemo_run as run

from rlad_megatron.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "cpu_demo" / "run_demo.py"


def node_agent_script(recipe: str, overrides: Sequence[str]) -> run.Script:
    return run.Script(path="rlad_megatron.launch.node", entrypoint="python", m=True, args=[recipe, *overrides])


def recipe_packager(recipe: str | Path, git_package: bool = False) -> tuple[run.Packager, str]:
    """(packager, recipe path as the job sees it): the recipe file lands at the top of the code folder."""
    path = Path(recipe).resolve()
    if git_package:  # the commit's tree plus the local recipe file (uncommitted edits included)
        return run.GitArchivePackager(
            include_pattern=str(path), include_pattern_relative_path=str(path.parent)
        ), path.name
    return run.PatternPackager(include_pattern=str(path), relative_path=str(path.parent)), path.name


def slurm_executor(cfg: RunConfig, tunnel, packager: run.Packager) -> run.SlurmExecutor:
    """One task per node on `launch.nodes` nodes, from the recipe's launch section."""
    la = cfg.launch
    return run.SlurmExecutor(
        account=la.account or None,
        partition=la.partition or None,
        nodes=la.nodes,
        ntasks_per_node=1,
        gpus_per_node=la.gpus_per_node,
        time=la.time_limit,
        exclusive=True,
        signal="USR1@120",
        job_name_prefix=f"{la.job_name}-",
        container_image=la.container_image or None,
        container_mounts=list(la.container_mounts),
        env_vars={
            "NCCL_DEBUG": "WARN",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
            "CUDA_DEVICE_MAX_CONNECTIONS": "1",
            **la.env,
        },
        tunnel=tunnel,
        packager=packager,
    )


def sbatch_text(cfg: RunConfig, recipe: str, overrides: Sequence[str], job_dir: str, git_package: bool = False) -> str:
    """The sbatch script nemo-run would submit, without a cluster; the code folder is filled under `job_dir`.

    Uses nemo-run 0.11's `package` and the scheduler's private `_submit_dryrun`; `exp.dryrun()` prints the same."""
    from nemo_run.run.torchx_backend.packaging import package
    from nemo_run.run.torchx_backend.schedulers.slurm import SlurmTunnelScheduler

    packager, job_recipe = recipe_packager(recipe, git_package)
    executor = slurm_executor(cfg, run.LocalTunnel(job_dir=job_dir), packager)
    # The experiment folder the local tunnel runs from (<job_dir>/<exp_id>), so the mounts point at this package.
    executor.assign(exp_id="rlad", exp_dir=str(Path(job_dir) / "rlad"), task_id="rlad", task_dir="rlad")
    app = package(name="rlad", fn_or_script=node_agent_script(job_recipe, overrides), executor=executor)
    return SlurmTunnelScheduler(session_name="rlad")._submit_dryrun(app, executor).request.materialize()


def plan_script(recipe: str, nodes: int, out: str) -> run.Script:
    """A real, quick CPU job: `rlad plan --json` of a recipe, written to `out`."""
    cmd = ["python", "-m", "rlad_megatron.cli", "plan", recipe, "--nodes", str(nodes), "--json"]
    return run.Script(inline=f"{shlex.join(cmd)} > {shlex.quote(out)}")


def demo_script(smoke: bool = True, done_file: str = "") -> run.Script:
    """The CPU demo from the repository root; reduced size via --smoke when the demo takes it, plus
    RLAD_DEMO_SMOKE=1 in its environment. `done_file` is written only when the demo exits 0."""
    if not DEMO.is_file():
        raise FileNotFoundError(f"{DEMO} does not exist yet: the CPU demo is not in this checkout")
    cmd = ["python", str(DEMO)] + (["--smoke"] if smoke and "--smoke" in DEMO.read_text() else [])
    line = f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}"
    if done_file:
        line += f" && echo ok > {shlex.quote(done_file)}"
    return run.Script(inline=line, env={"RLAD_DEMO_SMOKE": "1"} if smoke else {})


def run_local(name: str, script: run.Script) -> None:
    """Run one task through LocalExecutor and wait for it (logs under $NEMORUN_HOME/experiments)."""
    with run.Experiment(name, executor=run.LocalExecutor(), log_level="WARN") as exp:
        exp.add(script, name=name)
        exp.run(sequential=True, detach=False, tail_logs=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    slurm = sub.add_parser("slurm", help="submit (or --dryrun) the job on Slurm")
    slurm.add_argument("recipe")
    slurm.add_argument("overrides", nargs="*")
    slurm.add_argument("--dryrun", action="store_true", help="print the sbatch script and exit")
    slurm.add_argument("--ssh-host", default="", help="login node to submit through (default: this machine)")
    slurm.add_argument("--user", default="", help="SSH user")
    slurm.add_argument("--job-dir", default=str(Path.home() / ".nemo_run" / "slurm"), help="job folder on the cluster")
    slurm.add_argument("--git-package", action="store_true", help="ship the current git commit to the cluster")
    plan = sub.add_parser("plan-local", help="run `rlad plan` through LocalExecutor")
    plan.add_argument("recipe")
    plan.add_argument("--nodes", type=int, default=4)
    plan.add_argument("--out", default="plan.json")
    demo = sub.add_parser("demo-local", help="run the CPU demo through LocalExecutor")
    demo.add_argument("--full", action="store_true", help="full size instead of the smoke size")
    demo.add_argument("--done-file", default="", help="written when the demo succeeds")
    args = parser.parse_args(argv)

    if args.command == "plan-local":
        run_local("rlad-plan", plan_script(str(Path(args.recipe).resolve()), args.nodes, str(Path(args.out).resolve())))
        return 0
    if args.command == "demo-local":
        run_local("rlad-demo", demo_script(smoke=not args.full, done_file=args.done_file))
        return 0
    cfg = load_config(args.recipe, args.overrides)
    if args.dryrun:
        print(sbatch_text(cfg, args.recipe, args.overrides, args.job_dir, args.git_package))
        return 0
    tunnel = (
        run.SSHTunnel(host=args.ssh_host, user=args.user, job_dir=args.job_dir)
        if args.ssh_host
        else run.LocalTunnel(job_dir=args.job_dir)
    )
    packager, job_recipe = recipe_packager(args.recipe, args.git_package)
    with run.Experiment("rlad", executor=slurm_executor(cfg, tunnel, packager)) as exp:
        exp.add(node_agent_script(job_recipe, args.overrides), name="rlad")
        exp.run(detach=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
