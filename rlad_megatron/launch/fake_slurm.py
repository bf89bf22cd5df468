"""Stand-ins for Slurm's `srun` and `scontrol`, so a rendered job script runs on one machine (`rlad rehearse`).

`rlad rehearse` writes two tiny executables into DIR/bin (first on PATH) that call `srun_main` and
`scontrol_main` below. The job script then runs unchanged.

srun starts the command that follows its own options once per emulated node, each task in its own session,
with the variables a real node's task sees (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_NODEID, SLURM_PROCID,
SLURM_NTASKS, SLURM_NNODES, SLURM_LOCALID=0, SLURM_RESTART_COUNT, SLURMD_NODENAME) plus RLAD_BIND_HOST, the
node's own loopback address (127.0.0.<node + 1>), so each emulated node binds its own address. Kept from
Slurm: --kill-on-bad-exit (the first task that fails ends the others: SIGTERM, then SIGKILL after
KILL_WAIT_S, as Slurm's KillWait), SIGTERM / SIGINT forwarded to every task, exit status = the worst task's,
and every process left in a task's session killed at the end (what the step's cgroup does).
scontrol answers `show hostnames [LIST]` and `requeue JOBID` (recorded as DIR/requeue.<JOBID>).

Left out: more than one task per node, containers (--container-* is refused), GPU binding, step ids.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from rlad_megatron.launch.env import expand_hostlist

KILL_WAIT_S = 30.0
VALUE_OPTIONS = {"-N", "--nodes", "-n", "--ntasks", "--ntasks-per-node", "-J", "--job-name"}
SHIM = "#!{python}\nimport sys\nfrom rlad_megatron.launch.fake_slurm import {main}\nsys.exit({main}(sys.argv[1:]))\n"
REHEARSAL_DIR_ENV = "RLAD_REHEARSAL_DIR"


def loopback_address(node: int) -> str:
    return f"127.0.0.{node + 1}"


def loopback_nodelist(nodes: int) -> str:
    """SLURM_JOB_NODELIST of the emulated nodes in Slurm's compressed form, e.g. '127.0.0.[1-3]'."""
    return loopback_address(0) if nodes == 1 else f"127.0.0.[1-{nodes}]"


def node_env(base: Mapping[str, str], node: int, hosts: Sequence[str]) -> dict[str, str]:
    """The environment of the task on `node`: the job's variables plus the per-node ones."""
    n = str(len(hosts))
    return {
        **base,
        "SLURM_NODEID": str(node),
        "SLURM_PROCID": str(node),
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": n,
        "SLURM_NNODES": n,
        "SLURMD_NODENAME": hosts[node],
        "SLURM_RESTART_COUNT": base.get("SLURM_RESTART_COUNT", "0"),
        "RLAD_BIND_HOST": loopback_address(node),
    }


def parse_srun(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """({option: value}, command): srun's options come first, the command is the first non-option."""
    options: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if not eq and name in VALUE_OPTIONS:
            i += 1
            value = argv[i] if i < len(argv) else ""
        options[name] = value
        i += 1
    if i == len(argv):
        raise ValueError("srun: no command given")
    return options, list(argv[i:])


def _check_options(options: Mapping[str, str], hosts: Sequence[str]) -> None:
    if any(o.startswith("--container") for o in options):
        raise ValueError("fake srun: no container runtime on this machine (set launch.container_image to '')")
    nodes = options.get("--nodes", options.get("-N", str(len(hosts))))
    if int(nodes) != len(hosts):
        raise ValueError(f"fake srun: --nodes={nodes} but the allocation has {len(hosts)} node(s)")
    if options.get("--ntasks-per-node", "1") != "1":
        raise ValueError("fake srun: only --ntasks-per-node=1 is emulated")


def exit_status(code: int) -> int:
    """A task killed by signal S counts as 128 + S, as the shell reports it."""
    return 128 - code if code < 0 else code


class Tasks:
    """One process (and session) per node; signals and --kill-on-bad-exit as srun applies them."""

    def __init__(self, command: Sequence[str], envs: Sequence[Mapping[str, str]], kill_on_bad_exit: bool):
        self.kill_on_bad_exit = kill_on_bad_exit
        self.procs = [subprocess.Popen(list(command), env=dict(env), start_new_session=True) for env in envs]
        self.kill_at: float | None = None

    def terminate(self, why: str) -> None:
        if self.kill_at is None:
            print(f"srun: {why}; sending SIGTERM to {len(self.procs)} task(s)", file=sys.stderr, flush=True)
            self.kill_at = time.monotonic() + KILL_WAIT_S
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def on_signal(self, signum, _frame) -> None:
        self.terminate(f"got signal {signum}")

    def wait(self, poll_s: float = 0.2) -> int:
        while any(p.poll() is None for p in self.procs):
            failed = [i for i, p in enumerate(self.procs) if p.poll() not in (None, 0)]
            if failed and self.kill_on_bad_exit and self.kill_at is None:
                self.terminate(
                    f"error: task {failed[0]} exited with {exit_status(self.procs[failed[0]].returncode)}, "
                    "terminating the job step (--kill-on-bad-exit)"
                )
            if self.kill_at is not None and time.monotonic() > self.kill_at:
                self.kill_sessions()
            time.sleep(poll_s)
        self.kill_sessions()  # leftovers of any task (helpers a killed process left behind)
        return max(exit_status(p.returncode) for p in self.procs)

    def kill_sessions(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def srun_main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    try:
        hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
        options, command = parse_srun(argv)
        _check_options(options, hosts)
    except (KeyError, ValueError) as err:
        print(f"srun: error: {err}", file=sys.stderr)
        return 1
    tasks = Tasks(
        command,
        [node_env(env, i, hosts) for i in range(len(hosts))],
        options.get("--kill-on-bad-exit", "0") in ("", "1"),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, tasks.on_signal)
    return tasks.wait()


def scontrol_main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    if list(argv[:2]) == ["show", "hostnames"]:
        print("\n".join(expand_hostlist(argv[2] if len(argv) > 2 else env.get("SLURM_JOB_NODELIST", ""))))
        return 0
    if len(argv) == 2 and argv[0] == "requeue" and env.get(REHEARSAL_DIR_ENV):
        (Path(env[REHEARSAL_DIR_ENV]) / f"requeue.{argv[1]}").write_text(str(time.time()))
        print(f"scontrol: job {argv[1]} requeued (rehearsal: the next attempt is run by rlad rehearse)")
        return 0
    print(
        f"scontrol (rehearsal): only 'show hostnames' and 'requeue JOBID' are emulated, not {list(argv)}",
        file=sys.stderr,
    )
    return 1


def write_bin(bin_dir: Path, python: str = sys.executable) -> Path:
    """DIR/bin with the `srun` and `scontrol` shims (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, main in (("srun", "srun_main"), ("scontrol", "scontrol_main")):
        path = bin_dir / name
        path.write_text(SHIM.format(python=python, main=main))
        path.chmod(0o755)
    return bin_dir
