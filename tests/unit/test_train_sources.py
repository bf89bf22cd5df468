"""Sample sources of the loop (sample_sources.py) with a scripted engine: dynamic sampling, teacher traces."""

from __future__ import annotations

from types import SimpleNamespace

from rlad_megatron.config import load_config
from rlad_megatron.data.sampler import PromptSampler
from rlad_megatron.engines.base import GenerateOutput
from rlad_megatron.rewards.base import RewardResult
from rlad_megatron.sample_sources import SourceContext, StudentRollouts, TeacherTraces, step_seed


class ScriptedEngine:
    """'flat' prompts get identical responses (a zero-advantage group); 'varied' ones different lengths."""

    def __init__(self):
        self.seeds = []

    def generate(self, prompt_ids, sampling, n=1, on_sample=None):
        self.seeds.append(sampling.seed)
        out = [
            [
                GenerateOutput([5] * (1 if p[0] == 0 else s + 1), [-0.1] * (1 if p[0] == 0 else s + 1), "stop")
                for s in range(n)
            ]
            for p in prompt_ids
        ]
        for i, outs in enumerate(out):
            for s, one in enumerate(outs):
                if on_sample is not None:
                    on_sample(i, s, one)
        return out


def _ctx(kinds, **overrides):
    cfg = load_config(
        None, ["algorithm.group_size=2", "train.prompts_per_step=2"] + [f"{k}={v}" for k, v in overrides.items()]
    )
    items = [{"prompt_ids": [0 if kind == "flat" else 1], "record": {"kind": kind}} for kind in kinds]
    tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "x" * len(ids))
    reward = lambda text, record: RewardResult(float(len(text)), {"correct": len(text) >= 2})
    objective = SimpleNamespace(uses_rewards=True, needs_teacher=False)
    engine = ScriptedEngine()
    ctx = SourceContext(
        cfg=cfg,
        objective=objective,
        tokenizer=tokenizer,
        sampler=PromptSampler(items, shuffle=False),
        reward_fn=reward,
        rollout_engine=engine,
        teacher_engine=engine,
    )
    return ctx, engine


def test_without_dynamic_sampling_zero_advantage_groups_are_counted_and_kept():
    ctx, _ = _ctx(["flat", "varied"])
    samples, metrics = StudentRollouts().collect(ctx, step=1)
    assert len(samples) == 4 and metrics["zero_adv_group_frac"] == 0.5
    assert [s.group_index for s in samples] == [0, 0, 1, 1]


def test_dynamic_sampling_replaces_zero_advantage_groups_with_fresh_prompts():
    ctx, engine = _ctx(["flat", "varied", "varied", "flat"], **{"algorithm.dynamic_sampling": "true"})
    samples, metrics = StudentRollouts().collect(ctx, step=3)
    # Round 0: prompts 0 (flat, dropped) and 1 (varied); round 1 asks for 1 more prompt: 2 (varied).
    assert [s.record["kind"] for s in samples] == ["varied"] * 4
    assert [s.group_index for s in samples] == [0, 0, 1, 1]
    assert metrics["dynamic_sampling/rounds"] == 1 and metrics["dynamic_sampling/extra_prompts"] == 1
    assert metrics["dynamic_sampling/dropped_groups"] == 1 and metrics["dynamic_sampling/kept_frac"] == 1.0
    assert engine.seeds == [step_seed(ctx.cfg.seed, 3, 0), step_seed(ctx.cfg.seed, 3, 1)]
    assert ctx.sampler.state_dict()["position"] == 3


def test_dynamic_sampling_fills_up_with_zero_advantage_groups_when_rounds_run_out():
    ctx, _ = _ctx(["flat"] * 6, **{"algorithm.dynamic_sampling": "true", "algorithm.max_resample_rounds": "2"})
    samples, metrics = StudentRollouts().collect(ctx, step=1)
    assert len(samples) == 4 and metrics["dynamic_sampling/rounds"] == 2
    assert metrics["dynamic_sampling/extra_prompts"] == 4 and metrics["dynamic_sampling/kept_frac"] == 0.0


def test_teacher_traces_keep_only_rewarded_generations():
    ctx, _ = _ctx(["varied", "flat"], **{"algorithm.correct_reward_threshold": "2"})
    samples, metrics = TeacherTraces().collect(ctx, step=1)
    # varied: lengths 1 and 2 (one kept); flat: lengths 1 and 1 (none kept)
    assert [len(s.response_ids) for s in samples] == [2]
    assert metrics["teacher_traces/kept_frac"] == 0.25
