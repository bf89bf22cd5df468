"""`train(cfg)` (RLAD) with a tiny Qwen3-MoE student whose rollout engine and trainer route some tokens
differently, with and without `model.routing_replay`.

The honest source of the mismatch: the two sides compute in different precisions (a bfloat16 trainer
against the fp32 embedded engine; a bfloat16 `rlad serve` against an fp32 trainer), and the student's
routers have near ties (the router rows of experts 1-3 differ by 0.1 %, so bf16 rounding decides which of
them a token gets), with the expert outputs scaled up so a flipped expert moves the log-prob visibly.
Claims, on step 1 (before any update, so only numerics separate the two sides):
- without replay the trainer's old log-probs are far from the rollout's (max |diff| > 0.05);
- with replay the trainer routes each token to the rollout's experts and the gap shrinks to the precision
  gap (max |diff| < 0.01, k3 < 1e-5), while `routing/agreement` shows the trainer's own top-k would have
  disagreed on a large share of the (token, layer) pairs;
- the same through `rlad serve` over HTTP (routes as SGLang's base64 meta_info.routed_experts).
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import TINY, digit_reward, run_config, subprocess_env

from rlad_megatron import train as train_mod
from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny Qwen3-MoE (4 experts, top-2) with near-tied routers and loud experts."""
    from safetensors.torch import load_file, save_file

    from rlad_megatron.tiny_models import save_tiny_model

    folder = save_tiny_model(
        tmp_path_factory.mktemp("replay") / "moe", "qwen3_moe", seed=1, **dict(TINY, moe_intermediate_size=32)
    )
    weights = load_file(str(folder / "model.safetensors"))
    noise = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if name.endswith("mlp.gate.weight"):
            base = tensor[1].clone()
            for expert in (1, 2, 3):
                tensor[expert] = base + 1e-3 * base.abs().mean() * torch.randn(base.shape, generator=noise)
        elif name.endswith("down_proj.weight"):
            tensor *= 30.0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def _step1(tmp_path, student, name: str, overrides: list[str]) -> dict[str, float]:
    cfg = run_config(
        tmp_path / name, "rlad", ["algorithm.alpha=0.5", f"model.student={student}", "train.num_steps=1", *overrides]
    )
    (history,) = train_mod.train(cfg)
    return history


def _check(plain: dict[str, float], replayed: dict[str, float]) -> None:
    assert "routing/agreement" not in plain
    assert plain["kl/rollout_vs_old_max_abs"] > 0.05
    assert replayed["kl/rollout_vs_old_max_abs"] < 0.01 and abs(replayed["kl/rollout_vs_old_k3"]) < 1e-5
    assert replayed["routing/agreement"] < 0.9  # the trainer's own routing differed on many tokens


def test_replay_closes_the_gap_between_the_embedded_engine_and_a_bf16_trainer(tmp_path, student):
    plain = _step1(tmp_path, student, "plain", ["model.params_dtype=bfloat16"])
    replayed = _step1(tmp_path, student, "replay", ["model.params_dtype=bfloat16", "model.routing_replay=true"])
    _check(plain, replayed)


def test_replay_over_rlad_serve_in_bf16(tmp_path, student):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*embedded_server_cmd(str(student), port, threads=1), "--dtype", "bfloat16"]
    procs = launch_fleet([cmd], [url], str(tmp_path / "logs"), 120, env=subprocess_env())
    try:
        http = ["rollout.kind=http", f"rollout.urls=[{url}]", "rollout.sync=distributed", "rollout.sync_host=127.0.0.1"]
        plain = _step1(tmp_path, student, "plain", http)
        replayed = _step1(tmp_path, student, "replay", [*http, "model.routing_replay=true"])
    finally:
        for p in procs:
            p.stop(grace_s=5)
    _check(plain, replayed)
