"""Streaming scoring (sample_sources.GroupScorer): each prompt group is rewarded and teacher-scored as soon as
it finished generating, one teacher call per group, with dynamic sampling's filler scored afterwards."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from rlad_megatron.config import load_config
from rlad_megatron.data.sampler import PromptSampler
from rlad_megatron.engines.base import GenerateOutput, ScoreOutput
from rlad_megatron.rewards.base import RewardResult
from rlad_megatron.sample_sources import SourceContext, StudentRollouts


class RecordingTeacher:
    """Scores every token -1.0 and records the prompts of each call (one call = one batch)."""

    def __init__(self):
        self.calls: list[list[int]] = []
        self.scored = threading.Event()

    def score(self, ids, starts, top_k=0):
        self.calls.append([seq[0] for seq in ids])
        self.scored.set()
        return [ScoreOutput([-1.0] * (len(seq) - st)) for seq, st in zip(ids, starts)]


class TwoPhaseEngine:
    """Finishes prompt 0's group, then waits (up to `wait_s`) for the teacher to have scored it before it
    finishes the other prompts; records whether it had to give up waiting."""

    def __init__(self, teacher: RecordingTeacher, wait_s: float = 5.0):
        self.teacher, self.wait_s = teacher, wait_s
        self.teacher_scored_during_generation = None

    def generate(self, prompt_ids, sampling, n=1, on_sample=None):
        out = [
            [GenerateOutput([5] * (p[0] + s + 1), [-0.5] * (p[0] + s + 1), "stop") for s in range(n)]
            for p in prompt_ids
        ]
        for s in range(n):
            if on_sample is not None:
                on_sample(0, s, out[0][s])
        self.teacher_scored_during_generation = self.teacher.scored.wait(self.wait_s)
        for i in range(1, len(prompt_ids)):
            for s in range(n):
                if on_sample is not None:
                    on_sample(i, s, out[i][s])
        return out


def _ctx(prompts, engine, teacher, **overrides):
    cfg = load_config(
        None,
        ["algorithm.group_size=2", f"train.prompts_per_step={len(prompts)}"]
        + [f"{k}={v}" for k, v in overrides.items()],
    )
    items = [{"prompt_ids": [p], "record": {"p": p}} for p in prompts]
    return SourceContext(
        cfg=cfg,
        objective=SimpleNamespace(uses_rewards=True, needs_teacher=True, teacher_top_k=0),
        tokenizer=SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "x" * len(ids)),
        sampler=PromptSampler(items, shuffle=False),
        reward_fn=lambda text, record: RewardResult(float(len(text)), {"correct": True}),
        rollout_engine=engine,
        teacher_engine=teacher,
    )


@pytest.mark.parametrize("streaming", [True, False])
def test_a_group_is_teacher_scored_while_the_rest_still_generates(streaming):
    teacher = RecordingTeacher()
    engine = TwoPhaseEngine(teacher, wait_s=5.0 if streaming else 0.2)
    ctx = _ctx([1, 2, 3], engine, teacher, **{"train.stream_scoring": str(streaming).lower()})
    samples, metrics = StudentRollouts().collect(ctx, step=1)
    assert engine.teacher_scored_during_generation is streaming
    # one teacher call per prompt group, holding exactly that group's responses
    assert sorted(teacher.calls) == [[1, 1], [2, 2], [3, 3]]
    assert all(s.teacher_logprobs == [-1.0] * len(s.response_ids) for s in samples)
    assert all(s.reward == len(s.response_ids) for s in samples)
    assert metrics["time/score_after_generate"] >= 0.0


class FlatEngine:
    """Prompt 0's group has equal responses (zero advantage); the others differ in length."""

    def generate(self, prompt_ids, sampling, n=1, on_sample=None):
        out = [
            [
                GenerateOutput([5] * (1 if p[0] == 0 else s + 1), [-0.5] * (1 if p[0] == 0 else s + 1), "stop")
                for s in range(n)
            ]
            for p in prompt_ids
        ]
        for i, outs in enumerate(out):
            for s, one in enumerate(outs):
                if on_sample is not None:
                    on_sample(i, s, one)
        return out


def test_dynamic_sampling_scores_a_zero_advantage_group_only_when_it_is_kept_as_filler():
    teacher = RecordingTeacher()
    ctx = _ctx(
        [0, 1, 0],
        FlatEngine(),
        teacher,
        **{"algorithm.dynamic_sampling": "true", "algorithm.max_resample_rounds": "0"},
    )
    samples, _ = StudentRollouts().collect(ctx, step=1)
    # both flat groups are kept as filler (no resample rounds): scored after selection, still one call per group
    assert sorted(teacher.calls) == [[0, 0], [0, 0], [1, 1]]
    assert all(s.teacher_logprobs is not None for s in samples)

    teacher = RecordingTeacher()
    ctx = _ctx(
        [0, 1, 1, 1],
        FlatEngine(),
        teacher,
        **{"algorithm.dynamic_sampling": "true", "train.prompts_per_step": "2"},
    )
    samples, _ = StudentRollouts().collect(ctx, step=1)
    assert [s.record["p"] for s in samples] == [1, 1, 1, 1]
    assert sorted(teacher.calls) == [[1, 1], [1, 1]]  # the dropped flat group never reached the teacher
