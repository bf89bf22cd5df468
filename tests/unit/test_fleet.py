"""A fleet of 3 embedded HTTP servers (real uvicorn subprocesses on 127.0.0.1) behind HttpEngine.

Seeded samples are a pure function of (seed, prompt, sample index), so a sample retried on another
server after a crash must come back identical to the in-process reference: any loss, duplicate or
mix-up shows as a mismatch. The tests run in file order and share one fleet.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from rlad_megatron.engines.base import EngineError, SamplingParams
from rlad_megatron.engines.client import HttpEngine
from rlad_megatron.engines.embedded import EmbeddedEngine
from rlad_megatron.engines.fleet import (
    ServerProcess,
    embedded_server_cmd,
    free_port,
    launch_fleet,
    launch_router,
)
from rlad_megatron.tiny_models import save_tiny_model

SP = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7, ignore_eos=True)
PROMPTS = [[5 + (i % 40), 6 + (i % 7), 9] for i in range(50)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    save_tiny_model(root / "base", "qwen2", seed=0)
    save_tiny_model(root / "step_1", "qwen2", seed=5)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cmds = [embedded_server_cmd(str(root / "base"), p, weights_root=str(root), threads=1) for p in ports]
    procs = launch_fleet(cmds, urls, str(root / "logs"), timeout_s=120, env=env)
    state = {"root": root, "urls": urls, "procs": procs, "cmds": cmds, "env": env}
    yield state
    for p in state["procs"]:
        p.stop(grace_s=3)


@pytest.fixture(scope="module")
def reference(fleet):
    engine = EmbeddedEngine(str(fleet["root"] / "base"))
    return [[o.response_ids for o in row] for row in engine.generate(PROMPTS, SP, n=4)], engine


def _ids(results):
    return [[o.response_ids for o in row] for row in results]


def test_200_samples_come_back_exactly_once(fleet, reference):
    engine = HttpEngine(fleet["urls"], request_timeout_s=30)
    out = engine.generate(PROMPTS, SP, n=4)
    assert sum(len(row) for row in out) == 200
    assert all(len(o.response_ids) == len(o.logprobs) == 12 and o.finish_reason == "length" for row in out for o in row)
    assert _ids(out) == reference[0]
    engine.close()


def test_router_in_front_of_the_servers(fleet, reference):
    router = launch_router(fleet["urls"], free_port(), str(fleet["root"] / "logs"))
    if router is None:
        pytest.skip("sglang_router is not installed")
    try:
        engine = HttpEngine([router.url], request_timeout_s=30)
        out = engine.generate(PROMPTS[:10], SP, n=4)
        assert _ids(out) == reference[0][:10]
        seqs = [p + row[0] for p, row in zip(PROMPTS[:10], reference[0][:10])]
        starts = [1 + k % 4 for k in range(10)]  # mixed starts in one batch: the router forwards one integer
        remote = engine.score(seqs, starts, top_k=2)
        local = reference[1].score(seqs, starts, top_k=2)
        for a, b in zip(remote, local):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5) and a.topk_ids.tolist() == b.topk_ids.tolist()
        engine.close()
    finally:
        router.stop()


def test_server_killed_mid_batch_loses_nothing(fleet, reference):
    engine = HttpEngine(fleet["urls"], request_timeout_s=30, max_concurrency=32, cooldown_s=60)
    victim = fleet["procs"][1]

    def kill_when_busy():
        deadline = time.monotonic() + 20
        while engine.pool.servers[victim.url].inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        victim.kill()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    out = engine.generate(PROMPTS, SP, n=4)
    killer.join()
    assert _ids(out) == reference[0]
    dead = engine.pool.servers[victim.url]
    assert not dead.alive and dead.last_error and engine.stats["retries"] >= 1
    assert sum(s.alive for s in engine.pool.servers.values()) == 2
    fleet["engine"] = engine


def test_dead_server_rejoins_with_current_weights(fleet):
    engine, url = fleet["engine"], fleet["urls"][1]
    engine.update_weights(path=str(fleet["root"] / "step_1"), version=1)  # the dead server misses this update
    port = int(url.rsplit(":", 1)[1])
    cmd = embedded_server_cmd(str(fleet["root"] / "base"), port, weights_root=str(fleet["root"]), threads=1)
    proc = ServerProcess(cmd, url, str(fleet["root"] / "logs" / "restarted.log"), fleet["env"]).start()
    fleet["procs"][1] = proc
    proc.wait_healthy(120)
    assert httpx.get(url + "/get_model_info").json()["weight_version"] == "0"
    assert engine.health()  # probes the dead server, pushes version 1, marks it alive
    assert engine.pool.servers[url].alive
    assert httpx.get(url + "/get_model_info").json()["weight_version"] == "1"
    want = EmbeddedEngine(str(fleet["root"] / "step_1")).generate(PROMPTS[:8], SP, n=2)
    assert _ids(engine.generate(PROMPTS[:8], SP, n=2)) == _ids(want)


def test_all_servers_down_gives_a_clear_error_within_the_timeout(fleet):
    engine = fleet["engine"]
    for p in fleet["procs"]:
        p.kill()
    engine.request_timeout_s = 3.0
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="all servers are unreachable") as err:
        engine.generate(PROMPTS[:4], SP, n=2)
    assert time.monotonic() - t0 < 3.0 + 5.0
    assert "lost 8 of 8" in str(err.value) and all(u in str(err.value) for u in fleet["urls"])
    engine.close()
