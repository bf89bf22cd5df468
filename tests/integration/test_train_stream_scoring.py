"""Streaming scoring changes when the teacher works, not what it computes: a run that scores each prompt group
as soon as it finished generating yields the same samples, teacher scores and metrics, bit for bit, as one that
scores everything after generation."""

from __future__ import annotations

import json

import pytest
from train_helpers import digit_reward, run_config

from rlad_megatron import train as train_mod


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


def _run(root, algorithm, extra, streaming):
    cfg = run_config(
        root,
        algorithm,
        [
            "train.prompts_per_step=3",
            "algorithm.group_size=3",
            "rollout.max_new_tokens=8",
            "train.save_rollouts=true",
            "checkpoint.save_hf=false",
            f"train.stream_scoring={str(streaming).lower()}",
        ]
        + extra,
    )
    history = train_mod.train(cfg)
    rollouts = [(root / "rollouts" / f"step_{k}.jsonl").read_text() for k in (1, 2)]
    metrics = [{k: v for k, v in h.items() if not k.startswith(("time/", "throughput/"))} for h in history]
    return rollouts, metrics


@pytest.mark.parametrize(
    ("algorithm", "extra"), [("rlad", ["algorithm.alpha=0.5"]), ("gkd", ["algorithm.gkd_top_k=4"])]
)
def test_streaming_scoring_matches_scoring_after_generation_bit_for_bit(tmp_path, algorithm, extra):
    streamed_rollouts, streamed_metrics = _run(tmp_path / "streamed", algorithm, extra, True)
    after_rollouts, after_metrics = _run(tmp_path / "after", algorithm, extra, False)
    first = [json.loads(line) for line in streamed_rollouts[0].splitlines()]
    assert len(first) == 9 and all(s["teacher_logprobs"] for s in first)
    if algorithm == "gkd":
        assert all(len(row) == 4 for s in first for row in s["teacher_topk_logprobs"])
    assert streamed_rollouts == after_rollouts  # json floats round-trip exactly: equal text = equal bits
    assert streamed_metrics == after_metrics
