"""launch.server_impl=rlad: the node agent starts `rlad serve` with SGLang's flags, on one CPU machine.

`rlad serve` must take every flag the agent gives SGLang (honouring it or accepting it without effect), and
refuse by name what one CPU process cannot do. The end-to-end test runs a one-node job's servers and router
for real (tiny model, loopback address) with a script in place of torchrun.
"""

from __future__ import annotations

import argparse
import sys

import pytest
import torch
from test_launch_node_agent import RECIPE, config

from rlad_megatron import cli
from rlad_megatron.engines import server
from rlad_megatron.launch import node as agent
from rlad_megatron.launch.topology import plan_topology
from rlad_megatron.tiny_models import save_tiny_model

KEY = "t3acher-key-not-in-argv"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "m", "qwen3", max_position_embeddings=64))


@pytest.fixture
def argv(monkeypatch):
    """For cli.main: sys.argv restored afterwards, and a server that got past its checks fails the test
    instead of serving forever."""
    import uvicorn

    monkeypatch.setattr(sys, "argv", ["rlad"])  # cli.main rewrites sys.argv
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("rlad serve accepted the flags and served"))


def rlad_config(tmp_path, model, extra=()):
    return config(
        tmp_path,
        1,
        ["launch.server_impl=rlad", "launch.teacher_tp=1", f"model.student={model}", f"model.teacher={model}", *extra],
    )


def test_rlad_serve_takes_the_flags_the_agent_gives_sglang(tmp_path, model):
    cfg = rlad_config(
        tmp_path,
        model,
        [
            "teacher.server_args={enable_deterministic_inference: true, "
            "trust_remote_code: true, dtype: auto, context_length: 32, "
            "mem_fraction_static: 0.5, skip_tokenizer_init: true}",
            "rollout.server_args={dtype: bfloat16}",
        ],
    )
    cmds = agent.node_commands(cfg, plan_topology(cfg), 0, ["127.0.0.1"], RECIPE, [], env={})
    for _, argv in cmds["servers"]:
        parser = argparse.ArgumentParser()
        server.add_arguments(parser)
        args = parser.parse_args(argv[argv.index("serve") + 1 :] + ["--base-gpu-id", "3"])
        state = server.build_state(args)
        try:
            assert state.weights_root == str((tmp_path / "run").resolve())
            teacher = "--context-length" in argv
            assert state.engine.model.dtype == (torch.float32 if teacher else torch.bfloat16)  # auto: float32
            assert state.max_context == (32 if teacher else 64)
            assert (state.tokenizer is None) == teacher  # --skip-tokenizer-init honoured
        finally:
            state.scheduler.stop()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tp-size", "2"], "--tp-size 2: rlad serve runs one CPU process"),
        (
            ["--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "h0:31050"],
            "--nnodes 2: rlad serve runs on one node",
        ),
        (["--context-length", "65"], "--context-length 65 is longer than the model's max_position_embeddings"),
    ],
)
def test_settings_one_cpu_process_cannot_honour_are_refused_by_name(model, argv, capsys, flags, message):
    assert cli.main(["serve", "--model-path", model, *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--enable-torch-compile"], ["--chunked-prefill-size", "4096"], ["--mem-fraction", "0.8"], ["--tp", "1"]]
)
def test_other_sglang_flags_and_abbreviations_are_refused_by_name(model, argv, capsys, flags):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--model-path", model, *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"unrecognized arguments: {' '.join(flags)}" in err
    assert "rlad serve (the CPU stand-in for SGLang) honours only the SGLang flags listed in docs/launch.md" in err


TRAINER = """if True:
    import json, sys, urllib.request, urllib.error
    def post(url, body, headers={{}}):
        req = urllib.request.Request(url, json.dumps(body).encode(), {{"Content-Type": "application/json", **headers}})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)
    body = {{"input_ids": [5, 6, 7], "sampling_params": {{"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}}}}
    assert len(post("{rollout_router}/generate", body)["output_ids"]) == 3
    assert len(post("{teacher}/generate", body, {{"Authorization": "Bearer {key}"}})["output_ids"]) == 3
    try:
        post("{teacher}/generate", body)
        sys.exit("the keyed teacher answered without its key")
    except urllib.error.HTTPError as err:
        assert err.code == 401, err.code
    with urllib.request.urlopen("{rollout}/get_model_info", timeout=10) as resp:
        assert json.load(resp)["weight_version"] == "0"
"""


def test_a_one_node_job_runs_on_rlad_serve(tmp_path, model, monkeypatch, capfd):
    cfg = rlad_config(tmp_path, model, ["teacher.api_key_env=TEACHER_KEY"])
    la = cfg.launch
    local = "http://127.0.0.1"
    script = TRAINER.format(
        rollout_router=f"{local}:{la.rollout_router_port}",
        key=KEY,
        teacher=f"{local}:{la.teacher_port}",
        rollout=f"{local}:{la.rollout_port}",
    )
    real_wait = agent.wait_healthy
    monkeypatch.setattr(agent, "trainer_command", lambda *a, **k: ({}, [sys.executable, "-c", script]))
    monkeypatch.setattr(agent, "wait_healthy", lambda urls, timeout, **kw: real_wait(urls, 300, 0.5, **kw))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("RLAD_SGLANG_PYTHON", raising=False)
    env = {"RLAD_BIND_HOST": "127.0.0.1", "TEACHER_KEY": KEY, "SLURM_JOB_ID": "21"}
    assert agent.run_node(cfg, RECIPE, [], 0, ["127.0.0.1"], env) == 0
    out = capfd.readouterr().out
    assert "-m rlad_megatron.cli serve --model-path" in out and "sglang.launch_server" not in out
    assert KEY not in out
