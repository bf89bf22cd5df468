"""Server fleets: which servers are alive (ServerPool) and server processes (launch, health, stop).

ServerPool keeps one record per base URL. A transport error or 5xx marks a server dead with a
cool-down; picking a server prefers the live one with the fewest requests in flight; dead
servers past their cool-down are probed (GET /health) and rejoin when they answer, after an
optional `on_rejoin` hook (the client uses it to push the current weights version first).

ServerProcess / launch_fleet start N HTTP servers (`rlad serve` for the embedded engine,
SGLang's launcher on GPU nodes, see sglang_fleet.py), wait for /health_generate, and stop them
(SIGTERM, then SIGKILL after a grace period). launch_router puts sglang-router in front.
"""
from __future__ import annotations

import asyncio
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


class AllServersDown(RuntimeError):
    pass


@dataclass
class ServerPool:
    urls: list[str]
    cooldown_s: float = 2.0
    probe_timeout_s: float = 2.0
    on_rejoin: Callable[[str], Awaitable[None]] | None = None
    servers: dict[str, ServerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("a server pool needs at least one URL")
        self.urls = [u.rstrip("/") for u in self.urls]
        self.servers = {u: ServerState(u) for u in self.urls}
        self._probe_lock = asyncio.Lock()

    def mark_dead(self, url: str, reason: str) -> None:
        s = self.servers[url]
        s.alive, s.failures, s.last_error = False, s.failures + 1, reason
        s.retry_at = time.monotonic() + min(self.cooldown_s * (2 ** min(s.failures - 1, 4)), 30.0)

    def mark_ok(self, url: str) -> None:
        s = self.servers[url]
        s.alive, s.failures, s.last_error = True, 0, ""

    def live(self) -> list[ServerState]:
        return [s for s in self.servers.values() if s.alive]

    async def probe(self, client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> bool:
        try:
            r = await client.get(url + "/health", headers=headers, timeout=self.probe_timeout_s)
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
                self.mark_dead(url, f"rejoin failed: {err}")
                return False
        self.mark_ok(url)
        return True

    async def revive_due(self, client: httpx.AsyncClient, headers: dict[str, str], force: bool = False) -> None:
        """Probe dead servers whose cool-down has passed (all dead ones when force)."""
        async with self._probe_lock:
            now = time.monotonic()
            due = [s.url for s in self.servers.values() if not s.alive and (force or s.retry_at <= now)]
            if due:
                await asyncio.gather(*(self.probe(client, u, headers) for u in due))

    async def pick(self, client: httpx.AsyncClient, headers: dict[str, str], deadline: float) -> ServerState:
        """The live server with the fewest requests in flight; waits (probing) until `deadline`."""
        while True:
            await self.revive_due(client, headers)
            live = self.live()
            if live:
                return min(live, key=lambda s: s.inflight)
            if time.monotonic() >= deadline:
                raise AllServersDown("all servers are unreachable: " + "; ".join(
                    f"{s.url} ({s.last_error})" for s in self.servers.values()))
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
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
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


def embedded_server_cmd(model_dir: str, port: int, host: str = "127.0.0.1", weights_root: str = "",
                        max_batch_size: int = 64, threads: int = 0) -> list[str]:
    """`rlad serve` command line; the API key travels in env RLAD_API_KEY (argv is visible in ps)."""
    cmd = [sys.executable, "-m", "rlad_megatron.cli", "serve", "--model", str(model_dir), "--host", host,
           "--port", str(port), "--max-batch-size", str(max_batch_size)]
    if weights_root:
        cmd += ["--weights-root", str(weights_root)]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def launch_fleet(cmds: list[list[str]], urls: list[str], log_dir: str, timeout_s: float = 300.0,
                 env: dict | None = None, headers: dict | None = None) -> list[ServerProcess]:
    """Start every command, wait until all answer /health_generate; on failure stop them all and raise."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    procs = [ServerProcess(c, u, str(Path(log_dir) / f"server_{i}.log"), env).start()
             for i, (c, u) in enumerate(zip(cmds, urls))]
    try:
        for p in procs:
            p.wait_healthy(timeout_s, headers=headers)
    except Exception:
        for p in procs:
            p.stop(grace_s=2.0)
        raise
    return procs


def launch_router(worker_urls: list[str], port: int, log_dir: str, host: str = "127.0.0.1",
                  policy: str = "round_robin", timeout_s: float = 60.0) -> ServerProcess | None:
    """sglang-router in front of the workers; None when sglang_router is not installed."""
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        return None
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
           "--policy", policy, "--worker-urls", *worker_urls]
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    proc = ServerProcess(cmd, f"http://{host}:{port}", str(Path(log_dir) / "router.log")).start()
    proc.wait_healthy(timeout_s, path="/health")
    return proc
