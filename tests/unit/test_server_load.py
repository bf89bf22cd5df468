"""Bounded load test of one embedded HTTP server: concurrent clients on loopback for a fixed time.

Reports throughput and p50/p99 latency (run with -s to see them; docs/rollout.md records a run),
and checks zero errors and flat server memory (RSS after the run vs after a warm-up).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

import httpx
import psutil
import pytest

from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet
from rlad_megatron.tiny_models import save_tiny_model

CLIENTS = 16


async def _hammer(url: str, seconds: float, latencies: list, errors: list) -> None:
    async with httpx.AsyncClient(timeout=30) as client:

        async def worker(k: int) -> None:
            i = 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                body = {
                    "input_ids": [5 + k, 6 + i % 50, 7],
                    "return_logprob": True,
                    "sampling_params": {"temperature": 1.0, "max_new_tokens": 16, "sampling_seed": i},
                }
                t0 = time.perf_counter()
                try:
                    r = await client.post(url + "/generate", json=body)
                    ok = r.status_code == 200 and len(r.json()["output_ids"]) >= 1
                except httpx.HTTPError as err:
                    ok, r = False, err
                (latencies if ok else errors).append(time.perf_counter() - t0 if ok else repr(r))
                i += 1

        await asyncio.gather(*(worker(k) for k in range(CLIENTS)))


@pytest.mark.slow
def test_load_throughput_latency_errors_and_memory(tmp_path):
    save_tiny_model(tmp_path / "m", "qwen3", seed=0)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    (proc,) = launch_fleet(
        [embedded_server_cmd(str(tmp_path / "m"), port, threads=1)],
        [f"http://127.0.0.1:{port}"],
        str(tmp_path / "logs"),
        timeout_s=120,
        env=env,
    )
    try:
        rss = psutil.Process(proc.proc.pid)
        warm_lat, warm_err = [], []
        asyncio.run(_hammer(proc.url, 2.0, warm_lat, warm_err))
        rss_warm = rss.memory_info().rss
        latencies, errors = [], []
        t0 = time.perf_counter()
        asyncio.run(_hammer(proc.url, 6.0, latencies, errors))
        elapsed = time.perf_counter() - t0
        rss_end = rss.memory_info().rss
    finally:
        proc.stop()
    q = statistics.quantiles(latencies, n=100)
    print(
        f"\nload: {CLIENTS} clients, {len(latencies)} requests in {elapsed:.1f} s = {len(latencies) / elapsed:.1f} req/s "
        f"({16 * len(latencies) / elapsed:.0f} generated tok/s); latency p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms; "
        f"errors {len(errors) + len(warm_err)}; RSS {rss_warm / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB"
    )
    assert not errors and not warm_err, (errors + warm_err)[:3]
    assert len(latencies) > 50
    assert rss_end - rss_warm < 64 * 2**20, "server memory grew under steady load"
