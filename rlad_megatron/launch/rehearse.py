"""`rlad rehearse RECIPE [overrides] [--out DIR] [--steps 3]`: a recipe's real job, run on this one machine.

The idea: run the cluster job itself, only smaller, so what breaks on the cluster breaks here first. The
recipe is shrunk (every change printed: `rehearse_shrink`), tiny random models of the recipe's model shapes
and, where a data file is missing, a small generated one are written into DIR (`rehearse_inputs`); then
`rlad render` writes the job script with those overrides and bash runs it with DIR/bin first on PATH, where
a fake `srun` starts one node agent per emulated node (`fake_slurm`). From there everything is the real
path: node agents, sglang-router in front of each fleet, `rlad serve` servers, torchrun and the Megatron
trainer, weight sync into the servers every step, checkpoints. After the first attempt the job script runs
again as Slurm's requeued attempt (SLURM_RESTART_COUNT=1), which must resume from the last checkpoint and
finish. Faults on demand: kill -9 of the trainer ranks (the requeued attempt then finishes the run) or of
one rollout server mid-step (its node agent restarts it; the trainer's client retries the samples).

Swapped: SGLang -> `rlad serve` (same HTTP API), NCCL -> gloo, GPUs -> CPU processes, the recipe's models ->
tiny random ones (same family, vocabulary, GQA ratio, tying), cluster nodes -> loopback addresses 127.0.0.x.
Left out: several teachers (`teachers:`, refused with a message), containers, InfiniBand / NCCL settings,
several trainer nodes, SIGUSR1 preemption (the requeue
path is entered through a failed attempt instead), GPU memory and speed (see `rlad plan`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlad_megatron.config import RunConfig, load_config, parse_overrides
from rlad_megatron.launch import rehearse_inputs as inputs
from rlad_megatron.launch import rehearse_report as report
from rlad_megatron.launch import rehearse_shrink as shrink
from rlad_megatron.launch.env import expand_hostlist
from rlad_megatron.launch.fake_slurm import REHEARSAL_DIR_ENV, loopback_nodelist, write_bin
from rlad_megatron.launch.rehearse_watch import Faults, ServerWatch, descendants, kill9, latest_checkpoint

MARKER = ".rlad-rehearsal"
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHOWN = ("[20", "step ", "srun:", "eval @", "Traceback", "Error", "error:")  # job log lines echoed on screen
DATA_ROWS = {"data.train": ("train", 32), "data.eval": ("test", 8)}


@dataclass
class Plan:
    """The rehearsal's job: the recipe plus `overrides` (the rehearsal's `changes`, then the user's, which win)."""

    cfg: RunConfig
    overrides: list[str]
    changes: list[shrink.Change] = field(default_factory=list)

    @property
    def hosts(self) -> list[str]:
        return expand_hostlist(loopback_nodelist(self.cfg.launch.nodes))


def log(message: str) -> None:
    print(f"[rehearse] {message}", flush=True)


# ----------------------------------------------------------------------------- preparing the job
def prepare_out(out: Path) -> None:
    """A fresh DIR: one this command made before is emptied; any other non-empty folder is refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ValueError(f"--out {out} is not empty and was not made by rlad rehearse; pick a new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by rlad rehearse; emptied by the next rehearsal into this folder\n")


def default_out(recipe: str) -> str:
    """runs/rehearse/<recipe folder> for examples/<name>/recipe.yaml, else runs/rehearse/<file name>."""
    path = Path(recipe)
    return f"runs/rehearse/{path.parent.name if path.stem == 'recipe' else path.stem}"


def _load(recipe: str, user: list[str], changes: list[shrink.Change]) -> RunConfig:
    return load_config(recipe, [c.override() for c in changes] + user)


def model_changes(cfg: RunConfig, out: Path) -> list[shrink.Change]:
    """Tiny random models of the recipe's shapes (student at the trainer's TP / PP)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    paths, why = {}, {}
    for role, seed in (("student", 1), ("teacher", 2), ("reference", 3)):
        folder = getattr(cfg.model, role)
        if not folder:
            continue
        src = inputs.source_model(folder)
        target = out / "models" / role
        inputs.build_tiny_model(target, src, seed, *((pp, tp) if role != "teacher" else (1, 1)))
        paths[f"model.{role}"], why[f"model.{role}"] = str(target), f"tiny random {src.family} from {src.origin}"
    return shrink.path_changes(cfg, paths, why)


def data_changes(cfg: RunConfig, out: Path) -> list[shrink.Change]:
    paths, why = {}, {}
    for key, (split, size) in DATA_ROWS.items():
        source = shrink.get(cfg, key)
        if inputs.needs_replacement(source):
            path = inputs.write_addition_rows(out / "data" / f"{split}.jsonl", cfg.data, size, split, cfg.seed)
            paths[key], why[key] = str(path), f"missing here: {size} generated addition rows with the recipe's fields"
    return shrink.path_changes(cfg, paths, why)


def ports_needed(cfg: RunConfig, hosts: list[str]) -> tuple[dict, dict]:
    """(port field -> addresses binding it, port field -> consecutive ports) for the planned topology."""
    from rlad_megatron.launch.topology import plan_topology

    topo = plan_topology(cfg)
    hosts_of, counts = {}, {}
    for fleet, (node, _) in topo.routers.items():
        servers = topo.fleet(fleet)
        hosts_of[f"launch.{fleet}_port"] = sorted({hosts[s.nodes[0]] for s in servers})
        counts[f"launch.{fleet}_port"] = max(
            sum(s.nodes[0] == n for s in servers) for n in {s.nodes[0] for s in servers}
        )
        hosts_of[f"launch.{fleet}_router_port"] = [hosts[node]]
    return hosts_of, counts


def plan_job(recipe: str, user: list[str], out: Path, steps: int, kill_server: bool) -> Plan:
    """Shrink the recipe, then build the models at the shrunk TP / PP, then pick ports for the shrunk topology."""
    from rlad_megatron.launch.topology import fleets_to_launch

    cfg0 = load_config(recipe, user)
    if cfg0.teachers:
        raise ValueError(
            f"{recipe} has several teachers (`teachers:`), which rlad rehearse does not shrink yet (one tiny model "
            "and one port range per teacher); rehearse it with one teacher (teacher: + model.teacher), and check "
            "the several-teacher placement with `rlad plan` and `rlad render` (DRY_RUN=1)"
        )
    want_teacher = bool(fleets_to_launch(cfg0)[1])
    changes = shrink.without_user_fields(
        [
            shrink.Change("run_dir", cfg0.run_dir, str(out / "run"), "the rehearsal's own folder"),
            *shrink.job_size_changes(cfg0, steps),
            *shrink.layout_changes(cfg0, want_teacher),
            *shrink.machine_changes(cfg0, kill_server),
        ],
        user,
    )
    shaped = _load(recipe, user, changes)
    changes += shrink.without_user_fields(model_changes(shaped, out) + data_changes(shaped, out), user)
    shaped = _load(recipe, user, changes)
    hosts = expand_hostlist(loopback_nodelist(shaped.launch.nodes))
    changes += shrink.without_user_fields(shrink.port_changes(shaped, *ports_needed(shaped, hosts)), user)
    return Plan(_load(recipe, user, changes), [c.override() for c in changes] + user, changes)


def recipe_plan_seconds(recipe: str, user: list[str]) -> tuple[dict[str, float] | None, str]:
    """`rlad plan`'s per-phase seconds for the recipe as the cluster would run it (not the shrunk job), or
    (None, why) when the recipe cannot be planned here (e.g. a model folder whose config is not on this machine)."""
    from rlad_megatron.launch.plan import make_plan

    try:
        seconds = make_plan(load_config(recipe, user))["seconds"]
    except (OSError, ValueError, KeyError) as err:
        return None, f"rlad plan could not size the recipe ({err})"
    return {k: float(v) for k, v in seconds.items() if k != "total"}, ""


# ----------------------------------------------------------------------------- running attempts
def job_env(out: Path, job_id: str, nodes: int, restart: int) -> dict[str, str]:
    """What the batch shell of the job sees on a cluster (Slurm's variables), on this machine."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_VARS and not k.startswith("SLURM_")}
    env.update(
        PATH=f"{out / 'bin'}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
        PYTHON=sys.executable,
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NODELIST=loopback_nodelist(nodes),
        SLURM_NNODES=str(nodes),
        SLURM_RESTART_COUNT=str(restart),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        GRACE_S="60",
        **{REHEARSAL_DIR_ENV: str(out)},
    )
    return env


def _copy_output(stream, log_path: Path) -> None:
    with open(log_path, "w") as log_file:
        for line in stream:
            log_file.write(line)
            log_file.flush()
            if line.lstrip().startswith(SHOWN):
                print("  " + line.rstrip(), flush=True)


def _stop(proc: subprocess.Popen, grace_s: float = 90.0) -> None:
    """SIGTERM to the job script (its trap stops srun, which stops the agents); SIGKILL what is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    kill9(descendants(proc.pid))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_attempt(job: Plan, out: Path, job_id: str, restart: int, faults: Faults, timeout_s: float) -> report.Attempt:
    from rlad_megatron.launch.topology import plan_topology

    topo, run_dir = plan_topology(job.cfg), Path(job.cfg.run_dir)
    servers = {u: f for f in sorted(topo.routers) for u in topo.server_urls(f, job.hosts)}
    resumed_from = latest_checkpoint(run_dir)
    log_path = out / "logs" / f"attempt-{restart}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(
        f"attempt {restart}: bash {out / 'job.sbatch'} (SLURM_RESTART_COUNT={restart}"
        + (f", resuming from {resumed_from}" if resumed_from else "")
        + f"); log {log_path}"
    )
    watch = ServerWatch(servers).start()
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", str(out / "job.sbatch")],
        env=job_env(out, job_id, job.cfg.launch.nodes, restart),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    copier = threading.Thread(target=_copy_output, args=(proc.stdout, log_path), daemon=True)
    copier.start()
    try:
        while proc.poll() is None and time.monotonic() - started < timeout_s:
            faults.poll(proc.pid, started)
            time.sleep(0.2)
        if proc.poll() is None:
            log(f"attempt {restart} still running after {timeout_s:.0f} s: stopping it")
    finally:
        _stop(proc)
        watch.stop()
        copier.join(timeout=10)
    return report.Attempt(
        restart,
        proc.returncode,
        time.monotonic() - started,
        resumed_from,
        [asdict(s) for s in watch.seen.values()],
        faults.events,
        str(log_path),
    )


def run_attempts(job: Plan, out: Path, args: argparse.Namespace, killed_url: str) -> list[report.Attempt]:
    """Attempt 0 (with the faults asked for), then the requeued attempt 1 of the same job."""
    job_id, run_dir = str(os.getpid()), Path(job.cfg.run_dir)
    port = int(killed_url.rsplit(":", 1)[1]) if killed_url else 0
    faults = Faults(run_dir, args.kill_trainer_at_step, args.kill_server_at_step, port, log)
    first = run_attempt(job, out, job_id, 0, faults, args.timeout_s)
    log("the job's restart path: the same script again as Slurm's requeued attempt")
    return [first, run_attempt(job, out, job_id, 1, Faults(run_dir, log=log), args.timeout_s)]


def checks(job: Plan, attempts: list[report.Attempt], args: argparse.Namespace, killed_url: str) -> list[report.Check]:
    from rlad_megatron.launch.topology import plan_topology

    topo, run_dir, steps = plan_topology(job.cfg), Path(job.cfg.run_dir), job.cfg.train.num_steps
    rows, (first, last) = report.train_rows(run_dir), attempts
    out = [
        report.check_exit(first, expect_failure=bool(args.kill_trainer_at_step)),
        report.check_exit(last, False),
        report.check_steps(rows, steps),
    ]
    if job.cfg.train.max_staleness:
        out.append(report.check_staleness(rows, job.cfg.train.max_staleness))
    if "rollout" in topo.routers:
        out.append(report.check_logprobs(rows))
        out += [
            report.check_versions(a, steps) for a in attempts if not (a is first and args.kill_trainer_at_step)
        ]  # a killed attempt stops early
    if "teacher" in topo.routers:
        out.append(report.check_teacher_router(run_dir, rows, topo.urls(job.hosts)["teacher"]))
    if "rollout" in topo.routers:
        out.append(report.check_samples(rows, job.cfg.train.prompts_per_step * job.cfg.algorithm.group_size))
    if killed_url:
        out += [
            report.check_server_restarted(first, int(killed_url.rsplit(":", 1)[1])),
            report.check_server_rejoined(first, killed_url, steps),
        ]
    expected = f"step_{args.kill_trainer_at_step or steps}"
    out.append(
        report.Check(
            "requeued attempt resumed",
            last.resumed_from == expected,
            f"attempt 1 started from {last.resumed_from or 'no checkpoint'}, expected {expected}",
        )
    )
    return out


def _validate(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if args.kill_trainer_at_step and not 1 <= args.kill_trainer_at_step < args.steps:
        raise ValueError(f"--kill-trainer-at-step must be in 1..{args.steps - 1}: the kill lands in the step after")
    if args.kill_server_at_step and not 2 <= args.kill_server_at_step <= args.steps:
        raise ValueError(
            f"--kill-server-at-step must be in 2..{args.steps}: the kill is timed from the checkpoint "
            "of the step before"
        )


def rehearse(args: argparse.Namespace) -> int:
    from rlad_megatron.launch.render import render
    from rlad_megatron.launch.topology import plan_topology

    _validate(args)
    out = Path(args.out or default_out(args.recipe)).resolve()
    prepare_out(out)
    job = plan_job(
        args.recipe,
        parse_overrides(args.overrides + args.set_overrides),
        out,
        args.steps,
        bool(args.kill_server_at_step),
    )
    changes_table = shrink.table(job.changes)
    log(f"{args.recipe} -> {out}; changes from the recipe:\n{changes_table}")
    topo = plan_topology(job.cfg)
    log(topo.describe(job.hosts))
    killed_url = topo.server_urls("rollout", job.hosts)[0] if args.kill_server_at_step else ""
    (out / "job.sbatch").write_text(render(job.cfg, args.recipe, job.overrides))
    write_bin(out / "bin")
    plan_seconds, why_no_plan = recipe_plan_seconds(args.recipe, parse_overrides(args.overrides + args.set_overrides))
    started = time.monotonic()
    attempts = run_attempts(job, out, args, killed_url)
    found = checks(job, attempts, args, killed_url)
    text = report.write_report(
        out,
        args.recipe,
        changes_table,
        [asdict(c) for c in job.changes],
        report.train_rows(Path(job.cfg.run_dir)),
        attempts,
        found,
        plan_seconds,
        why_no_plan,
    )
    print(text)
    failed = [c.name for c in found if not c.ok]
    log(f"total {time.monotonic() - started:.0f} s; report {out / 'rehearsal.md'}")
    if failed:
        log(f"FAILED checks: {', '.join(failed)}")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (the cluster job to rehearse)")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted overrides, applied before the shrinking and never changed by it, e.g. rollout.sync=disk",
    )
    parser.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another override (repeatable; may follow the options)",
    )
    parser.add_argument(
        "--out", default="", help="rehearsal folder, emptied first (default runs/rehearse/<recipe name>)"
    )
    parser.add_argument("--steps", type=int, default=3, help="training steps (default 3)")
    parser.add_argument(
        "--kill-trainer-at-step",
        type=int,
        default=0,
        metavar="N",
        help="kill -9 the trainer ranks once step N is logged and checkpointed (N < --steps); "
        "the requeued attempt must resume from it and finish",
    )
    parser.add_argument(
        "--kill-server-at-step",
        type=int,
        default=0,
        metavar="N",
        help="kill -9 one rollout server during step N (N >= 2); its node agent restarts it",
    )
    parser.add_argument("--timeout-s", type=float, default=600.0, help="limit per job attempt (default 600)")


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through run_attempt, which stops the job it started


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return rehearse(args)
    except ValueError as err:
        print(f"rlad rehearse: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlad rehearse: interrupted; the job was stopped", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlad rehearse", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
