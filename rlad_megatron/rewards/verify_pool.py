"""A reusable pool of math-verify worker processes with a hard per-answer timeout.

Why processes: math-verify (sympy) can run for minutes on a crafted answer such as
`\\boxed{(10^{10^{10}})!}`, and its own timeouts use `signal.alarm`, which fails outside the
main thread. Each worker is a plain `python -m rlad_megatron.rewards._verify_worker` subprocess
talking JSON lines over pipes (no re-import of the caller's `__main__`, no fork of a process
holding torch threads). A job that exceeds `timeout_s` gets `timeout=True`; its worker is killed
and replaced, so one pathological answer costs one timeout, never a hung pool.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

_STARTUP_TIMEOUT_S = 120.0


class _Worker:
    def __init__(self) -> None:
        # The worker imports this package: make it importable even from an uninstalled checkout.
        root = str(Path(__file__).resolve().parents[2])
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            RLAD_VERIFY_PARENT_PID=str(os.getpid()),
            PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlad_megatron.rewards._verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,  # stderr inherited: import errors show
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are PIPEs
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.fd = self.stdout.fileno()
        self.buffer = b""
        self.ready = False

    def read_lines(self) -> list[bytes]:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            raise RuntimeError(
                f"math-verify worker {self.proc.pid} exited (code {self.proc.wait()}); see its error above "
                "(is math-verify installed in this environment?)"
            )
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return lines

    def wait_ready(self) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while not self.ready:
            sel = selectors.DefaultSelector()
            sel.register(self.fd, selectors.EVENT_READ)
            if not sel.select(max(deadline - time.monotonic(), 0)):
                raise RuntimeError(f"math-verify worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
            self.ready = b"ready" in self.read_lines()

    def send(self, gold: str, pred: str) -> None:
        self.stdin.write(json.dumps({"gold": gold, "pred": pred}).encode() + b"\n")
        self.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.stdin, self.stdout):
            f.close()


# Workers die with the thread that started them (PR_SET_PDEATHSIG, see parent_watch): start them all from
# one thread that lives as long as the process, never from a caller's short-lived thread.
_STARTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-worker-starter")


def _start_worker() -> _Worker:
    return _STARTER.submit(_Worker).result()


class VerifyPool:
    """`verify_many([(gold, pred), ...])` -> `[{"equal", "timeout", "error"}, ...]`, in order."""

    def __init__(self, num_workers: int = 1, timeout_s: float = 5.0) -> None:
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"VerifyPool needs num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.num_workers, self.timeout_s = num_workers, timeout_s
        self.workers: list[_Worker] = []
        self.num_replaced = 0
        self._lock = threading.Lock()

    def _ensure_workers(self, wanted: int) -> None:
        while len(self.workers) < min(wanted, self.num_workers):
            self.workers.append(_start_worker())
        for w in self.workers:
            w.wait_ready()

    def verify_many(self, pairs: Sequence[tuple[str, str]]) -> list[dict]:
        with self._lock:
            if not pairs:
                return []
            self._ensure_workers(len(pairs))
            return self._run(list(pairs))

    def _run(self, pairs: list[tuple[str, str]]) -> list[dict]:
        results: list[dict | None] = [None] * len(pairs)
        pending = deque(range(len(pairs)))
        busy: dict[int, tuple[int, float]] = {}  # worker slot -> (job index, deadline)
        while pending or busy:
            for slot, worker in enumerate(self.workers):
                if slot not in busy and pending:
                    job = pending.popleft()
                    worker.wait_ready()
                    worker.send(*pairs[job])
                    busy[slot] = (job, time.monotonic() + self.timeout_s)
            self._collect(busy, results)
        return results  # type: ignore[return-value]

    def _collect(self, busy: dict[int, tuple[int, float]], results: list[dict | None]) -> None:
        sel = selectors.DefaultSelector()
        for slot in busy:
            sel.register(self.workers[slot].fd, selectors.EVENT_READ, slot)
        wait = max(min(d for _, d in busy.values()) - time.monotonic(), 0.0)
        for key, _ in sel.select(wait):
            slot = key.data
            try:
                lines = self.workers[slot].read_lines()
            except RuntimeError as err:  # the worker died (e.g. out of memory): replace it, fail this job
                self._replace(slot)
                results[busy.pop(slot)[0]] = {"equal": False, "timeout": False, "error": str(err)}
                continue
            for line in lines:
                results[busy.pop(slot)[0]] = dict(json.loads(line), timeout=False)
        now = time.monotonic()
        for slot, (job, deadline) in list(busy.items()):
            if now >= deadline:
                self._replace(slot)
                results[job] = {"equal": False, "timeout": True, "error": f"no verdict within {self.timeout_s} s"}
                del busy[slot]

    def _replace(self, slot: int) -> None:
        self.workers[slot].kill()
        self.workers[slot] = _start_worker()
        self.num_replaced += 1

    def close(self) -> None:
        with self._lock:
            for w in self.workers:
                w.kill()
            self.workers = []


_POOLS: dict[tuple[int, float], VerifyPool] = {}


def shared_pool(num_workers: int = 1, timeout_s: float = 5.0) -> VerifyPool:
    """One pool per (num_workers, timeout_s) per process, closed at exit."""
    key = (num_workers, float(timeout_s))
    if key not in _POOLS:
        _POOLS[key] = VerifyPool(num_workers, timeout_s)
    return _POOLS[key]


@atexit.register
def _close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
