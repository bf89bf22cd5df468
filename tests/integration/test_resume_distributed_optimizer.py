"""A restarted job resumes a checkpoint that holds distributed-optimizer state into a fresh, never-stepped
optimizer (the shipped recipes set parallel.use_distributed_optimizer: true). Megatron's state_dict on a
fresh torch Adam asserted here before `checkpoint._give_fresh_state_a_step`."""

from __future__ import annotations

import pytest
import torch
from train_helpers import digit_reward, run_config

from rlad_megatron.observe import read_metrics
from rlad_megatron.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


def test_resume_with_distributed_optimizer_state_into_a_fresh_trainer(tmp_path):
    common = ["parallel.use_distributed_optimizer=true", "checkpoint.interval=1", "checkpoint.save_hf=false"]
    expected = [r for r in train(run_config(tmp_path / "uninterrupted", "grpo", common)) if r]
    train(run_config(tmp_path / "resumed", "grpo", common + ["train.num_steps=1"]))
    state = torch.load(next((tmp_path / "resumed" / "checkpoints" / "step_1").glob("common.pt")), weights_only=False)
    assert state["optimizer_saved"], "the step-1 checkpoint must hold optimizer state for this test to mean anything"
    train(run_config(tmp_path / "resumed", "grpo", common))  # a new trainer: fresh optimizer, then the load
    rows = [r for r in read_metrics(tmp_path / "resumed") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "grad_norm", "reward/mean"):
        assert rows[1][key] == pytest.approx(expected[1][key], rel=1e-5, abs=1e-7), key
