"""Numerical faults and debug modes of the training loop (in-process, tiny models)."""

from __future__ import annotations

import math

import pytest
from train_helpers import digit_reward, run_config

from rlad_megatron import train as train_mod
from rlad_megatron.backends.megatron.checkpoint import latest_checkpoint
from rlad_megatron.observe import read_metrics


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


def _poison(steps):
    def hook(step, advantages):
        return [[float("nan")] * len(a) for a in advantages] if step in steps else advantages

    return hook


def test_one_bad_step_is_skipped_and_training_continues(tmp_path, capsys):
    cfg = run_config(tmp_path / "run", "grpo", ["train.num_steps=3", "train.max_bad_steps=2", "checkpoint.interval=1"])
    history = train_mod.train(cfg, advantage_hook=_poison({2}))
    assert [h["skipped"] for h in history] == [0.0, 1.0, 0.0]
    assert math.isnan(history[1]["loss"]) and math.isfinite(history[2]["loss"])
    assert "step 2: non-finite loss or gradient; update skipped (1/2 consecutive)" in capsys.readouterr().err
    # The bad step wrote no checkpoint; the good ones did.
    assert latest_checkpoint(cfg.run_dir).name == "step_3"
    assert not (tmp_path / "run" / "checkpoints" / "step_2").exists()


def test_a_nan_gradient_with_a_finite_loss_is_skipped_too(tmp_path, monkeypatch, capsys):
    """The loss is fine but one parameter's gradient is NaN (a tensor hook poisons it during step 2's
    backward): the update is skipped exactly like a NaN loss, and the weights stay finite."""
    import torch

    from rlad_megatron.backends.megatron import trainer as trainer_mod

    original = trainer_mod.MegatronTrainer.train_step

    def train_step(self, samples, advantages, step, **kwargs):
        param = next(p for p in self.model[0].parameters() if p.requires_grad)
        handle = param.register_hook(lambda grad: torch.full_like(grad, float("nan"))) if step == 2 else None
        try:
            return original(self, samples, advantages, step, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    monkeypatch.setattr(trainer_mod.MegatronTrainer, "train_step", train_step)
    cfg = run_config(tmp_path / "run", "grpo", ["train.num_steps=3", "train.max_bad_steps=2", "checkpoint.interval=1"])
    history = train_mod.train(cfg)
    assert [h["skipped"] for h in history] == [0.0, 1.0, 0.0]
    assert all(math.isfinite(h["loss"]) for h in history)  # only the gradient was bad
    assert "step 2: non-finite loss or gradient; update skipped (1/2 consecutive)" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints" / "step_2").exists()
    assert math.isfinite(history[2]["grad_norm"])  # step 3 trained on finite weights


def test_consecutive_bad_steps_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    cfg = run_config(tmp_path / "run", "grpo", ["train.num_steps=5", "train.max_bad_steps=2", "checkpoint.interval=1"])
    with pytest.raises(train_mod.TrainingStopped, match="2 consecutive non-finite steps"):
        train_mod.train(cfg, advantage_hook=_poison({2, 3}))
    assert latest_checkpoint(cfg.run_dir).name == "step_1"
    assert [r["skipped"] for r in read_metrics(cfg.run_dir)] == [0.0, 1.0, 1.0]


def test_rollout_only_then_train_only_replays_the_saved_rollouts(tmp_path):
    gen = run_config(tmp_path / "gen", "rlad", ["train.mode=rollout_only"])
    gen_history = train_mod.train(gen)
    saved = sorted((tmp_path / "gen" / "rollouts").glob("step_*.jsonl"))
    assert [p.name for p in saved] == ["step_1.jsonl", "step_2.jsonl"]
    assert "loss" not in gen_history[0] and gen_history[0]["num_samples"] == 4

    replay = run_config(
        tmp_path / "replay", "rlad", ["train.mode=train_only", f"train.rollout_dir={tmp_path / 'gen' / 'rollouts'}"]
    )
    history = train_mod.train(replay)
    # Same samples (rewards, teacher scores) as generated, now trained on without any engine.
    assert [h["reward/mean"] for h in history] == [h["reward/mean"] for h in gen_history]
    assert all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    assert "time/generate" in history[0] and "time/score" not in history[0]


def test_resume_flags_refuse_what_they_cannot_do(tmp_path):
    cfg = run_config(tmp_path / "run", "grpo", ["train.num_steps=1"])
    with pytest.raises(train_mod.ResumeError, match="no complete checkpoint"):
        train_mod.train(cfg, resume=True)
    train_mod.train(cfg)
    with pytest.raises(train_mod.ResumeError, match="already holds checkpoints"):
        train_mod.train(cfg, resume=False)
    assert train_mod.train(cfg) == []  # the default resumes: nothing left to do after step 1
