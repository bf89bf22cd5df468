"""`rlad train` (RLAD) with a tiny Qwen3-MoE student for two steps on CPU: embedded engine, Megatron
MoE trainer, per-step weight sync of every expert, HF export of the trained experts."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import TINY, digit_reward, run_config

from rlad_megatron import train as train_mod


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


def test_rlad_two_steps_with_moe_student(tmp_path):
    from rlad_megatron.conversion.hf_io import resolve_latest
    from rlad_megatron.engines.model import iter_safetensors
    from rlad_megatron.tiny_models import save_tiny_model

    student = save_tiny_model(tmp_path / "moe_student", "qwen3_moe", seed=1, **dict(TINY, moe_intermediate_size=32))
    cfg = run_config(tmp_path / "run", "rlad", ["algorithm.alpha=0.5", f"model.student={student}"])
    history = train_mod.train(cfg)
    assert [round(h["num_samples"]) > 0 for h in history] == [True, True]
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0.0 for h in history)
    # Step 2 samples from the engine synced after step 1: engine and trainer agree on every token.
    assert history[1]["kl/rollout_vs_old_max_abs"] < 1e-4
    before = dict(iter_safetensors(student))
    after = dict(iter_safetensors(resolve_latest(f"{cfg.run_dir}/hf")))
    assert set(before) == set(after)
    changed = [k for k in before if "experts" in k and not torch.equal(before[k], after[k])]
    assert changed, "two optimizer steps left every expert unchanged"
