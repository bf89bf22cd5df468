"""What `rlad rehearse` watches while a job attempt runs, and the faults it injects.

* `ServerWatch` polls every server's /get_model_info once a second: when it first answered (start-up time),
  the last weight version it reported (the version it served when the job stopped it), and how often it
  came back after going down (a restarted server rejoining).
* `descendants` / `trainer_ranks` / `server_process` find the job's processes through /proc, starting from
  the job script's own process, so only processes this rehearsal started are ever signalled.
* `Faults` decides, from the run folder (metrics.jsonl, the latest checkpoint), when to kill -9 the trainer
  ranks (once step N is logged and checkpointed, so during step N+1) or one rollout server (during step N).

Left out: faults of routers and node agents, network partitions, slow (rather than dead) servers.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlad_megatron.observe import read_metrics


@dataclass
class ServerSeen:
    url: str
    fleet: str
    first_up_s: float | None = None
    version: str | None = None
    rejoined: int = 0
    up: bool = False
    went_down: bool = False


@dataclass
class ServerWatch:
    """Background poller of the servers' /get_model_info (1 s period, 2 s timeout)."""

    servers: dict[str, str]
    """url -> fleet"""
    started: float = field(default_factory=time.monotonic)
    period_s: float = 1.0
    seen: dict[str, ServerSeen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.seen = {u: ServerSeen(u, f) for u, f in self.servers.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rehearse-watch", daemon=True)

    def start(self) -> ServerWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for url, seen in self.seen.items():
                self._observe(seen, model_info(url))
            self._stop.wait(self.period_s)

    def _observe(self, seen: ServerSeen, info: dict | None) -> None:
        if info is None:
            seen.went_down |= seen.up
            seen.up = False
            return
        if seen.first_up_s is None:
            seen.first_up_s = time.monotonic() - self.started
        if seen.went_down and not seen.up:
            seen.rejoined += 1
        seen.up, seen.version = True, str(info.get("weight_version"))


def model_info(url: str, timeout_s: float = 2.0) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/get_model_info", timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- processes
def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    """Every live process below `root` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            children.setdefault(_parent(int(entry)), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def trainer_ranks(root: int) -> list[int]:
    """The trainer's rank processes (the `rlad_megatron.cli train` workers torchrun started, not torchrun)."""

    def is_rank(argv: Sequence[str]) -> bool:
        launcher = any("torchrun" in a or "torch.distributed.run" in a for a in argv)
        return "rlad_megatron.cli" in argv and "train" in argv and not launcher

    return [pid for pid in descendants(root) if is_rank(cmdline(pid))]


def server_process(root: int, port: int) -> int | None:
    """The server process listening on `port` (not a router, whose --worker-urls name the port too)."""
    for pid in descendants(root):
        argv = cmdline(pid)
        if (
            "--port" in argv
            and argv[argv.index("--port") + 1 :][:1] == [str(port)]
            and not any("router" in a for a in argv)
        ):
            return pid
    return None


def kill9(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ----------------------------------------------------------------------------- fault injection
def last_train_step(run_dir: Path) -> int:
    return max((int(r["step"]) for r in read_metrics(run_dir) if r.get("kind") == "train"), default=0)


def latest_checkpoint(run_dir: Path) -> str:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return pointer.read_text().strip()
    except OSError:
        return ""


@dataclass
class Faults:
    """Kills to inject into one attempt; `poll` is called a few times a second while the job runs."""

    run_dir: Path
    kill_trainer_at: int = 0
    kill_server_at: int = 0
    server_port: int = 0
    log: Callable[[str], None] = print
    events: list[dict] = field(default_factory=list)
    _server_due: float | None = None

    def poll(self, job_pid: int, started: float) -> None:
        if self.kill_trainer_at and not self._done("trainer") and self._checkpointed(self.kill_trainer_at):
            ranks = trainer_ranks(job_pid)
            kill9(ranks)
            self._record(
                "trainer",
                started,
                f"kill -9 of {len(ranks)} trainer rank(s) {ranks} once step "
                f"{self.kill_trainer_at} was logged and checkpointed",
            )
        if self.kill_server_at and not self._done("server"):
            self._maybe_kill_server(job_pid, started)

    def _maybe_kill_server(self, job_pid: int, started: float) -> None:
        """Timed from step N-1's checkpoint (the loop starts step N's generation right after it), plus half of
        step N-1's generation time, so that the kill lands while step N's requests are in flight."""
        if self._server_due is None and latest_checkpoint(self.run_dir) == f"step_{self.kill_server_at - 1}":
            rows = [r for r in read_metrics(self.run_dir) if r.get("step") == self.kill_server_at - 1]
            generate_s = float(rows[0].get("time/generate", 0.0)) if rows else 0.0
            self._server_due = time.monotonic() + min(generate_s / 2, 5.0)
        if self._server_due is not None and time.monotonic() >= self._server_due:
            pid = server_process(job_pid, self.server_port)
            if pid is not None:
                kill9([pid])
                self._record(
                    "server",
                    started,
                    f"kill -9 of the rollout server on port {self.server_port} "
                    f"(pid {pid}) during step {self.kill_server_at}",
                )

    def _checkpointed(self, step: int) -> bool:
        """Step `step` logged and its checkpoint published: the requeued attempt must resume from it."""
        return last_train_step(self.run_dir) >= step and latest_checkpoint(self.run_dir) == f"step_{step}"

    def _done(self, kind: str) -> bool:
        return any(e["kind"] == kind for e in self.events)

    def _record(self, kind: str, started: float, what: str) -> None:
        self.events.append({"kind": kind, "at_s": round(time.monotonic() - started, 1), "what": what})
        self.log(f"fault: {what}")
