"""The node agent's children: start them, restart a crashed server or router, stop them all on a signal.

A server that exits while the job runs (a CUDA error, an OOM kill, a segfault) is started again with the
same command after a back-off (RESTART_BACKOFF_S, doubling, capped at MAX_BACKOFF_S), up to
`launch.restart_servers` times per child and job attempt; the trainer's HTTP client meanwhile marks it dead
and lets it rejoin once /health answers (with the current weights). A child out of restarts ends the node
with its exit code, and srun --kill-on-bad-exit ends the job. The trainer itself is never restarted here: a
failed trainer is the job's failure (the requeued job resumes from its checkpoint).

`supervise()` does one round and never blocks, so the agent calls it from its wait loops: while waiting for
health, while torchrun runs, and on server-only nodes while waiting for the done-file.
SIGTERM, SIGINT and SIGUSR1 stop every child with SIGTERM (and no more restarts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Command = tuple[dict[str, str], list[str]]  # (extra environment, argv)
REDACTED = "<redacted>"
RESTART_BACKOFF_S = 5.0  # first restart delay; doubles with every restart of the same child
MAX_BACKOFF_S = 60.0


def log(phase: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"[{stamp}] [{phase}] {message}", flush=True)


def redact(argv: Sequence[str], keys: Mapping[str, str]) -> list[str]:
    """argv with every key (alone or inside an argument such as `teacher.api_key=K`) replaced by <redacted>."""
    secrets = [k for k in keys.values() if k]
    out = []
    for arg in argv:
        for secret in secrets:
            arg = arg.replace(secret, REDACTED)
        out.append(arg)
    return out


def exit_status(returncode: int) -> int:
    """A child's return code as a process exit status: killed by signal N (-N) -> 128 + N, as shells report."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Child:
    name: str
    command: Command
    proc: subprocess.Popen
    restartable: bool
    restarts: int = 0
    restart_at: float | None = None  # set while a crashed child waits out its back-off


class Supervisor:
    """Children of this node; SIGTERM, SIGINT and SIGUSR1 stop all of them with SIGTERM."""

    def __init__(self, keys: Mapping[str, str] | None = None, max_restarts: int = 0) -> None:
        self.keys = dict(keys or {})  # redacted from the logged command lines
        self.max_restarts = max_restarts
        self.children: list[Child] = []
        self.stopping = False
        # SIGUSR1 is Slurm's early warning (--signal=USR1@120 without B:, as nemo-run sends it).
        self._previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        }

    @property
    def procs(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.children]

    def _spawn(self, command: Command) -> subprocess.Popen:
        env, argv = command
        log("start", " ".join(redact(argv, self.keys)))
        return subprocess.Popen(argv, env={**os.environ, **env})

    def start(self, command: Command, name: str = "", restartable: bool = False) -> subprocess.Popen:
        """Start `command`; a restartable child (a server, a router) is started again when it exits."""
        child = Child(name or command[1][0], command, self._spawn(command), restartable)
        self.children.append(child)
        return child.proc

    def supervise(self) -> Child | None:
        """One round: note crashed restartable children, restart those whose back-off is over; return a child
        that exited with no restarts left (the node must fail), else None."""
        if self.stopping:
            return None
        now = time.monotonic()
        for child in self.children:
            if not child.restartable or child.proc.poll() is None:
                continue
            if child.restart_at is None:
                code = child.proc.returncode
                if child.restarts >= self.max_restarts:
                    log(
                        "error",
                        f"{child.name} exited with {code}; no restarts left "
                        f"(launch.restart_servers={self.max_restarts})",
                    )
                    return child
                delay = min(RESTART_BACKOFF_S * 2**child.restarts, MAX_BACKOFF_S)
                log(
                    "restart",
                    f"{child.name} exited with {code}; restart {child.restarts + 1}/{self.max_restarts} "
                    f"in {delay:.0f} s",
                )
                child.restart_at = now + delay
            elif now >= child.restart_at:
                child.restarts, child.restart_at = child.restarts + 1, None
                child.proc = self._spawn(child.command)
        return None

    def close(self, grace_s: float = 60.0) -> None:
        """Stop the children (no more restarts) and give the signals back to their previous handlers."""
        self.stopping = True
        self.stop(grace_s)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, _frame) -> None:
        log("stop", f"signal {signum}: forwarding SIGTERM to {len(self.children)} process(es)")
        self.stopping = True
        self.stop()

    def stop(self, grace_s: float = 60.0) -> None:
        procs = self.procs
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
