"""Scaled-RoPE students train on the CPU demo path: `rlad train`'s loop, 2 RLAD steps, embedded engines.

A Llama-3.x-style student (llama3 RoPE with parameters other than Llama 3.1's) and a Qwen3 student
with YaRN, each with a teacher of the same architecture. Step 2 samples from the engine synced after
step 1, so its rollout log-probs must equal the trainer's: a RoPE difference between the Megatron
student and the embedded engine shows up as a non-zero rollout-vs-old KL.
"""

from __future__ import annotations

import math

import pytest
from train_helpers import TINY, digit_reward, run_config

from rlad_megatron import train as train_mod
from rlad_megatron.tiny_models import save_tiny_model

CASES = {
    "llama-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 4.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 8.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "qwen3-yarn": (
        "qwen3",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
}


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scaled_rope_student_trains_and_engine_matches_trainer(tmp_path, case):
    family, rope = CASES[case]
    sizes = dict(TINY, initializer_range=0.2, head_dim=16) if family == "qwen3" else dict(TINY, initializer_range=0.2)
    save_tiny_model(tmp_path / "student", family, seed=1, **sizes, **rope)
    save_tiny_model(tmp_path / "teacher", family, seed=2, **sizes, **rope)
    cfg = run_config(tmp_path / "run", "rlad", ["algorithm.alpha=0.5"])  # uses tmp_path/{student,teacher}
    history = train_mod.train(cfg)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    assert abs(history[1]["kl/rollout_vs_old_k1"]) < 1e-4
    assert history[1]["kl/rollout_vs_old_k3"] < 1e-6
