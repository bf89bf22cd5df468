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


class MeetingTeacher:
    """A teacher whose score calls wait (up to 5 s) until the other teacher is scoring too, then score every
    token with its own value; records whether the other was met (both in flight at the same time)."""

    def __init__(self, value: float, meeting: threading.Barrier):
        self.value, self.meeting, self.met, self.prompts = value, meeting, [], []

    def score(self, ids, starts, top_k=0):
        try:
            self.meeting.wait(timeout=5.0)
            self.met.append(True)
        except threading.BrokenBarrierError:
            self.met.append(False)
        self.prompts += [seq[0] for seq in ids]
        return [ScoreOutput([self.value] * (len(seq) - st)) for seq, st in zip(ids, starts)]


class AllAtOnceEngine:
    def generate(self, prompt_ids, sampling, n=1, on_sample=None):
        return [[GenerateOutput([5] * 3, [-0.5] * 3, "stop") for _ in range(n)] for _ in prompt_ids]


@pytest.mark.parametrize("streaming", [True, False])
def test_two_teachers_score_their_own_groups_at_the_same_time(streaming):
    from rlad_megatron.sample_sources import score_with_teachers

    meeting = threading.Barrier(2)
    math, code = MeetingTeacher(-1.0, meeting), MeetingTeacher(-2.0, meeting)
    ctx = _ctx([1, 2], AllAtOnceEngine(), None, **{"train.stream_scoring": str(streaming).lower()})
    ctx.teacher_engines = {"math": math, "code": code}
    for item, name in zip(ctx.sampler.dataset, ("math", "code")):
        item["record"]["teacher"] = name
    samples, _ = StudentRollouts().collect(ctx, step=1)
    assert (math.prompts, code.prompts) == ([1, 1], [2, 2])  # each group to the teacher its record names
    assert math.met == code.met == [True]  # the two groups were scored concurrently, not one after the other
    assert [s.teacher_logprobs[0] for s in samples] == [-1.0, -1.0, -2.0, -2.0]
    # the loop's fallback for samples a source left unscored routes and overlaps the same way
    for s in samples:
        s.teacher_logprobs = None
    score_with_teachers(ctx.engines_by_teacher(), samples, top_k=0, drop_final_eos=False)
    assert math.met == code.met == [True, True]
    assert [s.teacher_logprobs[0] for s in samples] == [-1.0, -1.0, -2.0, -2.0]
    samples[0].record["teacher"] = "physics"
    with pytest.raises(KeyError, match="a sample names teacher 'physics' but the run's teachers are"):
        score_with_teachers(ctx.engines_by_teacher(), samples[:1], top_k=0, drop_final_eos=False)
