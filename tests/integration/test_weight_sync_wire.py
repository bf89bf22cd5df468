"""Weight sync over the wire into separately started `rlad serve` servers, as a cluster job does it.

The trainer runs under torchrun (TP=2, then PP=2, gloo) with `rollout.kind=http` pointed at two servers;
each step ends with the distributed protocol (one group per pipeline stage). Proof that the weights
arrived: every server then reports the step as its weight version, and the log-probs the servers return
for their samples equal the trainer's own log-probs of the same tokens (kl/rollout_vs_old_max_abs, fp32
on both sides) at every step, which a missed, partial or misnamed tensor would break.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from train_helpers import make_models, subprocess_env

from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet

pytestmark = [pytest.mark.dist, pytest.mark.slow]
STEPS = 3


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recipe(tmp_path: Path, student: Path, teacher: Path, urls: list[str], sync: str) -> Path:
    recipe = tmp_path / f"recipe_{sync}.yaml"
    recipe.write_text(f"""
seed: 5
model: {{student: {student}, teacher: {teacher}}}
algorithm: {{name: opd, group_size: 2}}
rollout: {{kind: http, urls: [{", ".join(urls)}], max_new_tokens: 6, sync: {sync}, sync_host: 127.0.0.1}}
teacher: {{kind: embedded}}
data: {{train: "task:addition", task_kwargs: {{size: 16}}}}
train: {{num_steps: {STEPS}, prompts_per_step: 2, lr: 0.05}}
checkpoint: {{interval: 0, save_hf: false}}
logging: {{tensorboard: false, progress_bar: false}}
""")
    return recipe


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("wire")
    student, teacher = make_models(root)
    ports = [free_port() for _ in range(2)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cmds = [embedded_server_cmd(str(student), p, weights_root=str(root), threads=1) for p in ports]
    procs = launch_fleet(cmds, urls, str(root / "logs"), timeout_s=120, env=subprocess_env())
    yield root, student, teacher, urls
    for p in procs:
        p.stop(grace_s=5)


def _train(root: Path, name: str, recipe: Path, layout: list[str]) -> list[dict]:
    run_dir = root / name
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    cmd = torchrun + ["-m", "rlad_megatron.train_cli", "--config", str(recipe), f"run_dir={run_dir}", *layout]
    log = root / f"{name}.log"
    with open(log, "wb") as out:
        code = subprocess.run(cmd, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600).returncode
    assert code == 0, log.read_text()[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def _versions(urls: list[str]) -> list[str]:
    return [str(httpx.get(u + "/model_info", timeout=10).json()["weight_version"]) for u in urls]


@pytest.mark.parametrize(
    "layout",
    [["parallel.tensor_model_parallel_size=2"], ["parallel.pipeline_model_parallel_size=2"]],
    ids=["tp2", "pp2"],
)
def test_distributed_sync_reaches_every_server_each_step(servers, layout):
    root, student, teacher, urls = servers
    name = layout[0].split(".")[1].split("_")[0] + "_wire"
    metrics = _train(root, name, _recipe(root, student, teacher, urls, "distributed"), layout)
    steps = [m for m in metrics if "kl/rollout_vs_old_max_abs" in m]
    assert [m["step"] for m in steps] == list(range(1, STEPS + 1))
    assert _versions(urls) == [str(STEPS)] * 2
    for m in steps:  # step 1 samples come from the servers' initial weights, later ones from synced weights
        assert m["kl/rollout_vs_old_max_abs"] < 1e-5, m
        assert m["grad_norm"] > 0


def _sync(engine, sender, calls, bucket, version: int) -> list[str]:
    """What trainer rank 0 and a one-stage sender do each step (components.sync_over_wire, by hand)."""
    members, restarted = engine.sync_members()
    if members != sender.members or restarted:
        engine.sync_generation += 1
        sender.connect(members, engine.sync_generation)
    calls.post_all(members, "/begin_weight_update", {})
    sender.send(bucket, version)
    calls.post_all(members, "/end_weight_update", {})
    engine.synced(members, version, calls.versions(members))
    return members


def test_restarted_server_stays_out_until_the_next_sync_then_gets_current_weights(servers, tmp_path):
    """kill -9 of one server; restarted on the same port it serves its start-up weights, so the client keeps
    it out (a stale version must not generate); the next sync rebuilds the group with it and both agree."""
    import torch
    from safetensors.torch import load_file

    from rlad_megatron.engines.base import SamplingParams
    from rlad_megatron.engines.client import HttpEngine, StaleWeightsError
    from rlad_megatron.engines.fleet import ServerProcess
    from rlad_megatron.engines.weight_sync import ServerCalls, StageSender

    root, student, _, _ = servers
    ports = [free_port() for _ in range(2)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    cmds = [embedded_server_cmd(str(student), p, threads=1) for p in ports]
    procs = launch_fleet(cmds, urls, str(tmp_path / "logs"), timeout_s=120, env=subprocess_env())
    engine = HttpEngine(urls, cooldown_s=0.1)
    calls = ServerCalls(timeout_s=60)
    sender = StageSender(0, calls, "127.0.0.1", "gloo", 60)
    weights = load_file(str(next(student.glob("*.safetensors"))))
    try:
        torch.manual_seed(0)
        step1 = [(n, t + 0.05 * torch.randn_like(t)) for n, t in weights.items()]
        assert _sync(engine, sender, calls, step1, 1) == urls
        procs[1].kill()
        procs[1] = ServerProcess(cmds[1], urls[1], str(tmp_path / "logs" / "restarted.log"), subprocess_env()).start()
        procs[1].wait_healthy(120)
        assert calls.versions(urls)[urls[1]] == "0"
        # the restarted server answers with its start-up weights: the client takes it out and resamples
        # elsewhere, and the pool's probe keeps it out (stale version) until a sync reaches it
        outs = engine.generate([[5, 6, 7]] * 4, SamplingParams(temperature=1.0, max_new_tokens=3, seed=3))
        assert len(outs) == 4 and all(len(o) == 1 for o in outs)
        engine.health()
        assert not engine.pool.servers[urls[1]].alive
        assert "rejoins after the next weight sync" in engine.pool.servers[urls[1]].last_error
        step2 = [(n, t + 0.05 * torch.randn_like(t)) for n, t in weights.items()]
        assert engine.sync_members() == (urls, True)  # same URLs, but one restarted: a new group is needed
        assert _sync(engine, sender, calls, step2, 2) == urls
        assert engine.sync_generation == 2 and calls.versions(urls) == {u: "2" for u in urls}
        greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
        per_server = [HttpEngine([u]).generate([[5, 6, 7]], greedy)[0][0] for u in urls]
        assert per_server[0].response_ids == per_server[1].response_ids
        assert max(abs(a - b) for a, b in zip(per_server[0].logprobs, per_server[1].logprobs)) < 1e-6
        # every server restarted: no waiting for one to become current, the caller is told to sync again
        for i in range(2):
            procs[i].kill()
            procs[i] = ServerProcess(
                cmds[i], urls[i], str(tmp_path / "logs" / f"again_{i}.log"), subprocess_env()
            ).start()
        for proc in procs:
            proc.wait_healthy(120)
        started = time.monotonic()
        with pytest.raises(StaleWeightsError, match="older weights than the last sync"):
            engine.generate([[5, 6, 7]], greedy)
        assert time.monotonic() - started < 30  # not the 300 s request timeout
        _sync(engine, sender, calls, step2, 2)
        assert engine.generate([[5, 6, 7]], greedy)[0][0].response_ids == per_server[0].response_ids
    finally:
        sender.close()
        engine.close()
        for p in procs:
            p.stop(grace_s=5)
