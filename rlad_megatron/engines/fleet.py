"""Server fleets: which servers are alive (ServerPool) and server processes (launch, health, stop).

ServerPool keeps one record per base URL. A transport error or 5xx marks a server dead with a
cool-down; picking a server prefers the live one with the fewest requests in flight; dead
servers past their cool-down are probed (GET /health, up to `probe_timeout_s`: SGLang answers
it with a 1-token generation) and rejoin when they answer, after an optional `on_rejoin` hook
(the client uses it to push the current weights version first). While some server is live the
probes run in the background, so a slow or hung server never delays requests.

ServerProcess / launch_fleet start N HTTP servers (`rlad serve` for the embedded engine,
SGLang's launcher on GPU nodes, see sglang_fleet.py), wait for /health_generate, and stop them
(SIGTERM, then SIGKILL after a grace period). launch_router puts sglang-router in front, each
router with its own Prometheus port (sglang-router 0.3.2 binds 0.0.0.0:29000 by default, so a
second router on the same host would die with "Address already in use").

`import_error(python, module)` asks another interpreter whether it can import a module (SGLang
lives in another environment than the trainer in the image), once per (interpreter, module).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class ServerState:
    url: str
    alive: bool = True
    inflight: int = 0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str = ""
    stale: bool = False
    """Out because it serves an older weights version (it restarted); only a weight sync brings it back."""


class AllServersDown(RuntimeError):
    pass


class StaleServer(RuntimeError):
    """A server answers, but with weights older than the ones the trainer last synced."""


class AllServersStale(AllServersDown):
    """Every server is up but stale: waiting cannot help, the trainer has to sync weights again."""


@dataclass
class ServerPool:
    urls: list[str]
    cooldown_s: float = 2.0
    probe_timeout_s: float = 30.0  # SGLang's /health runs a 1-token generation: seconds under load
    on_rejoin: Callable[[str], Awaitable[None]] | None = None
    servers: dict[str, ServerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("a server pool needs at least one URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.servers = {u: ServerState(u) for u in self.urls}
        self._probing: set[str] = set()  # URLs with a /health probe in flight (one at a time per server)
        self._background: set[asyncio.Task] = set()  # keeps background probes referenced until they finish

    def mark_dead(self, url: str, reason: str, stale: bool = False) -> None:
        s = self.servers[url]
        s.alive, s.failures, s.last_error, s.stale = False, s.failures + 1, reason, stale
        s.retry_at = time.monotonic() + min(self.cooldown_s * (2 ** min(s.failures - 1, 4)), 30.0)

    def mark_ok(self, url: str) -> None:
        s = self.servers[url]
        s.alive, s.failures, s.last_error, s.stale = True, 0, "", False

    def live(self) -> list[ServerState]:
        return [s for s in self.servers.values() if s.alive]

    async def probe(
        self, client: httpx.AsyncClient, url: str, headers: dict[str, str], timeout_s: float | None = None
    ) -> bool:
        try:
            r = await client.get(url + "/health", headers=headers, timeout=timeout_s or self.probe_timeout_s)
            ok = r.status_code == 200
        except httpx.HTTPError as err:
            ok, reason = False, f"{type(err).__name__}: {err}"
        else:
            reason = f"health returned {r.status_code}"
        if not ok:
            self.mark_dead(url, reason)
            return False
        if self.on_rejoin is not None:
            try:
                await self.on_rejoin(url)
            except Exception as err:  # noqa: BLE001 (a server that cannot resync stays out)
                self.mark_dead(url, f"rejoin failed: {err}", stale=isinstance(err, StaleServer))
                return False
        self.mark_ok(url)
        return True

    def _claim_due(self, force: bool) -> list[str]:
        """Dead servers whose cool-down has passed (all dead ones when force), marked as being probed."""
        now = time.monotonic()
        due = [
            s.url
            for s in self.servers.values()
            if not s.alive and (force or (s.retry_at <= now and s.url not in self._probing))
        ]
        self._probing.update(due)
        return due

    async def _probe_claimed(
        self, client: httpx.AsyncClient, url: str, headers: dict[str, str], timeout_s: float | None = None
    ) -> bool:
        try:
            return await self.probe(client, url, headers, timeout_s)
        finally:
            self._probing.discard(url)

    async def revive_due(
        self, client: httpx.AsyncClient, headers: dict[str, str], force: bool = False, timeout_s: float | None = None
    ) -> None:
        """Probe dead servers whose cool-down has passed (all dead ones when force) and wait for the answers."""
        due = self._claim_due(force)
        if due:
            await asyncio.gather(*(self._probe_claimed(client, u, headers, timeout_s) for u in due))

    def revive_in_background(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        """Start the due probes without waiting: a hung server's slow /health must not stall requests
        that live servers can take."""
        for url in self._claim_due(False):
            task = asyncio.ensure_future(self._probe_claimed(client, url, headers))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def pick(self, client: httpx.AsyncClient, headers: dict[str, str], deadline: float) -> ServerState:
        """The live server with the fewest requests in flight; waits (probing) until `deadline`."""
        while True:
            if self.live():
                self.revive_in_background(client, headers)
                return min(self.live(), key=lambda s: s.inflight)
            left = deadline - time.monotonic()
            if left > 0:  # nobody to serve: wait for the probes, but not past the request's deadline
                await self.revive_due(client, headers, timeout_s=max(0.1, min(self.probe_timeout_s, left)))
            live = self.live()
            if live:
                return min(live, key=lambda s: s.inflight)
            if all(s.stale for s in self.servers.values()):
                raise AllServersStale(
                    "every server serves older weights than the last sync: "
                    + "; ".join(f"{s.url} ({s.last_error})" for s in self.servers.values())
                )
            if time.monotonic() >= deadline:
                raise AllServersDown(
                    "all servers are unreachable: "
                    + "; ".join(f"{s.url} ({s.last_error})" for s in self.servers.values())
                )
            wait = min(s.retry_at for s in self.servers.values()) - time.monotonic()
            await asyncio.sleep(max(0.05, min(wait, deadline - time.monotonic(), 1.0)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess with its URL and log file."""

    def __init__(self, cmd: list[str], url: str, log_path: str | None = None, env: dict | None = None):
        self.cmd, self.url, self.log_path, self.env = cmd, url, log_path, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 (lives with proc)
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return self

    def wait_healthy(self, timeout_s: float, path: str = "/health_generate", headers: dict | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server {self.url} exited with code {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + path, timeout=5.0, headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server {self.url} not healthy after {timeout_s:.0f} s; log: {self.log_path}")

    def kill(self) -> None:
        """SIGKILL (simulates a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.kill()


def embedded_server_cmd(
    model_dir: str,
    port: int,
    host: str = "127.0.0.1",
    weights_root: str = "",
    max_batch_size: int = 64,
    threads: int = 0,
) -> list[str]:
    """`rlad serve` command line; the API key travels in env RLAD_API_KEY (argv is visible in ps)."""
    cmd = [
        sys.executable,
        "-m",
        "rlad_megatron.cli",
        "serve",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--max-batch-size",
        str(max_batch_size),
    ]
    if weights_root:
        cmd += ["--weights-root", str(weights_root)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def launch_fleet(
    cmds: list[list[str]],
    urls: list[str],
    log_dir: str,
    timeout_s: float = 300.0,
    env: dict | None = None,
    headers: dict | None = None,
) -> list[ServerProcess]:
    """Start every command, wait until all answer /health_generate; on failure stop them all and raise."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    procs = [
        ServerProcess(c, u, str(Path(log_dir) / f"server_{i}.log"), env).start()
        for i, (c, u) in enumerate(zip(cmds, urls))
    ]
    try:
        for p in procs:
            p.wait_healthy(timeout_s, headers=headers)
    except Exception:
        for p in procs:
            p.stop(grace_s=2.0)
        raise
    return procs


@functools.cache
def import_error(python: str, module: str) -> str:
    """'' when `python -c "import <module>"` works, else why not (a missing interpreter, the last line of the
    traceback). Cached: one subprocess per (interpreter, module) and process."""
    if python == sys.executable:
        return "" if importlib.util.find_spec(module) is not None else f"No module named '{module}'"
    try:
        done = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{type(err).__name__}: {err}"
    if done.returncode == 0:
        return ""
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"


def router_cmd(
    python: str,
    worker_urls: list[str],
    host: str,
    port: int,
    metrics_port: int,
    policy: str = "round_robin",
    extra: list[str] | None = None,
) -> list[str]:
    """sglang-router's command line, with its Prometheus exporter on `host:metrics_port`: its default
    (0.0.0.0:29000) is shared by every router on a host, and the second one to bind it panics."""
    return [
        python,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(metrics_port),
        "--policy",
        policy,
        *(extra or []),
        "--worker-urls",
        *worker_urls,
    ]


def launch_router(
    worker_urls: list[str],
    port: int,
    log_dir: str,
    host: str = "127.0.0.1",
    policy: str = "round_robin",
    timeout_s: float = 60.0,
    python: str = sys.executable,
) -> ServerProcess | None:
    """sglang-router in front of the workers (from `python`'s environment); None when it has no sglang_router."""
    if import_error(python, "sglang_router"):
        return None
    cmd = router_cmd(python, worker_urls, host, port, free_port(), policy)
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    proc = ServerProcess(cmd, f"http://{host}:{port}", str(Path(log_dir) / "router.log")).start()
    proc.wait_healthy(timeout_s)  # /health_generate: the router's /health says 200 before it has a worker
    return proc
