"""Health probes against slow servers: SGLang's /health runs a 1-token generation and may take seconds.

A server whose /health answers after 3 s is healthy (it must rejoin, and it must pass the node agent's
check); a hung server's probe must not hold up requests that a live server can take.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import time

import httpx
import pytest

from rlad_megatron.config import RolloutConfig
from rlad_megatron.engines import build_engine
from rlad_megatron.engines.fleet import ServerPool
from rlad_megatron.launch import node as agent

SLOW_S = 3.0  # longer than the old fixed 2 s probe timeout


def serve_health(delay_s: float):
    """A local HTTP server whose /health (and /health_generate) answers 200 after `delay_s`."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(delay_s)
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def slow_server():
    server, url = serve_health(SLOW_S)
    yield url
    server.shutdown()


def test_the_pool_keeps_a_server_whose_health_is_slow(slow_server):
    cfg = RolloutConfig(kind="http", urls=[slow_server])
    assert cfg.health_timeout_s == 30
    engine = build_engine(cfg, "", "rollout")
    try:
        assert engine.pool.probe_timeout_s == 30
        engine.pool.mark_dead(slow_server, "simulated failure")
        assert engine.health(), engine.pool.servers[slow_server].last_error
        assert engine.pool.servers[slow_server].alive
    finally:
        engine.close()
    short = build_engine(RolloutConfig(kind="http", urls=[slow_server], health_timeout_s=1), "", "rollout")
    try:  # the setting is what the probe waits: a 1 s timeout drops the same server
        short.pool.mark_dead(slow_server, "simulated failure")
        assert not short.health() and "Timeout" in short.pool.servers[slow_server].last_error
    finally:
        short.close()


def test_a_hung_server_does_not_delay_picking_a_live_one(slow_server):
    hung, hung_url = serve_health(20.0)

    async def pick_while_hung_is_due() -> float:
        pool = ServerPool([hung_url, slow_server], cooldown_s=0.01)
        pool.mark_dead(hung_url, "simulated failure")
        await asyncio.sleep(0.05)  # its cool-down is over: the next pick wants to probe it
        async with httpx.AsyncClient() as client:
            t0 = time.monotonic()
            picked = await pool.pick(client, {}, deadline=time.monotonic() + 30)
            took = time.monotonic() - t0
            assert picked.url == slow_server and hung_url in pool._probing  # probe still running, in background
            for task in list(pool._background):
                task.cancel()
        return took

    try:
        assert asyncio.run(pick_while_hung_is_due()) < 1.0
    finally:
        hung.shutdown()


def test_the_node_agent_waits_for_a_slow_health_generate(slow_server):
    agent.wait_healthy([slow_server + "/health_generate"], timeout_s=20, poll_s=0.1)
    with pytest.raises(TimeoutError):  # a probe cut at 1 s never sees the answer
        agent.wait_healthy([slow_server + "/health_generate"], timeout_s=2.5, poll_s=0.1, probe_timeout_s=1)
