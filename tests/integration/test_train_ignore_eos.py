"""rollout.ignore_eos through the loop: every response runs to max_new_tokens even where every token is a stop."""

from __future__ import annotations

import pytest
from train_helpers import run_config

from rlad_megatron.sample_sources import load_rollouts
from rlad_megatron.train import train

EVERY_TOKEN = "[" + ",".join(str(i) for i in range(128)) + "]"  # the tiny models' whole vocabulary


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_ignore_eos_makes_every_response_full_length(tmp_path, ignore_eos):
    cfg = run_config(
        tmp_path / "run",
        "grpo",
        [
            "train.mode=rollout_only",
            "train.num_steps=1",
            f"rollout.stop_token_ids={EVERY_TOKEN}",
            f"rollout.ignore_eos={str(ignore_eos).lower()}",
        ],
    )
    train(cfg, resume=False)
    samples = load_rollouts(tmp_path / "run" / "rollouts" / "step_1.jsonl")
    assert samples
    lengths = {len(s.response_ids) for s in samples}
    reasons = {s.finish_reason for s in samples}
    if ignore_eos:
        assert lengths == {cfg.rollout.max_new_tokens} and reasons == {"length"}
    else:  # the first token is a stop token: the control shows the stops are really there
        assert lengths == {1} and reasons == {"stop"}
