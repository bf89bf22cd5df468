"""Two real sglang-routers on one host: each needs its own Prometheus port.

sglang-router 0.3.2 binds its metrics exporter on 0.0.0.0:29000 unless told otherwise, so the second router
on a host panics ("Address already in use") and exits. Both places that start routers are checked: the
in-process fleet's `launch_router` and the node agent's `router_command` (a one-node job runs a rollout and
a teacher router side by side). A trivial HTTP worker stands in for the SGLang servers.
"""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_launch_node_agent import RECIPE, config

from rlad_megatron.engines.fleet import free_port, launch_router
from rlad_megatron.launch import node as agent
from rlad_megatron.launch.topology import plan_topology

pytest.importorskip("sglang_router")


class Worker(http.server.BaseHTTPRequestHandler):
    """Answers the GETs sglang-router makes when it registers a worker (health, server and model info)."""

    def do_GET(self):
        body = b"{}"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def start_worker(port: int = 0) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Worker)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def healthy(url: str, procs: list[subprocess.Popen], timeout_s: float = 90.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def test_two_fleet_routers_on_one_host_both_answer(tmp_path):
    worker = start_worker()
    url = f"http://127.0.0.1:{worker.server_address[1]}"
    routers = []
    try:
        for name in ("rollout", "teacher"):
            router = launch_router([url], free_port(), str(tmp_path / name), timeout_s=90)
            assert router is not None
            routers.append(router)
        for router in routers:
            assert httpx.get(router.url + "/health", timeout=5).status_code == 200
            assert router.proc.poll() is None
    finally:
        for router in routers:
            router.stop()
        worker.shutdown()


def port_pair() -> int:
    """A port p with p + 100 (its router's Prometheus port) free as well."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 100))
                return port
            except OSError:
                continue


def dead_logs(procs: list[subprocess.Popen], logs: list) -> str:
    return "\n".join(
        f"router {i} exited {p.returncode}:\n"
        + "\n".join(line for line in open(log.name).read().splitlines() if " INFO" not in line)[-2000:]
        for i, (p, log) in enumerate(zip(procs, logs))
        if p.poll() is not None
    )


def test_the_node_agents_two_routers_on_one_node_both_answer(tmp_path):
    # one node: a teacher and a rollout server, each fleet with its router
    ports = [f"launch.rollout_router_port={port_pair()}", f"launch.teacher_router_port={port_pair()}"]
    cfg = config(tmp_path, 1, ports)
    topo, hosts = plan_topology(cfg), ["127.0.0.1"]
    workers = [start_worker(s.port) for s in topo.servers]
    env = {"RLAD_BIND_HOST": "127.0.0.1", "RLAD_SGLANG_PYTHON": sys.executable}
    commands = agent.node_commands(cfg, topo, 0, hosts, RECIPE, [], env=env)["routers"]
    assert len(commands) == 2
    logs = [open(tmp_path / f"router{i}.log", "wb") for i in range(2)]  # noqa: SIM115 (closed below)
    procs = [subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT) for (_, argv), log in zip(commands, logs)]
    try:
        for fleet, (_, port) in sorted(topo.routers.items()):
            assert healthy(f"http://127.0.0.1:{port}", procs), (
                f"{fleet} router died or never answered:\n{dead_logs(procs, logs)}"
            )
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
        for log in logs:
            log.close()
        for worker in workers:
            worker.shutdown()
