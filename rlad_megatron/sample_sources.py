"""Where a step's samples come from: small strategy objects the loop calls as `source.collect(...)`.

  StudentRollouts  (every on-policy algorithm) prompts -> group_size responses each from the
                   rollout engine -> rewards -> optional dynamic sampling: groups whose rewards
                   are all equal (zero advantage) are dropped and replaced by fresh prompts, for at
                   most `algorithm.max_resample_rounds` extra rounds (counted in the metrics).
  TeacherTraces    (sft, train.offline_source=teacher) the TEACHER generates group_size responses
                   per prompt; only those with reward >= algorithm.correct_reward_threshold are kept
                   (rejection sampling).
  DatasetTraces    (sft, train.offline_source=dataset) each row's reference solution trace.
  SavedRollouts    (train.mode=train_only) replays <rollout_dir>/step_N.jsonl.

`sample_source(cfg)` picks one from a table, so the loop itself never tests algorithm names.
Sampling is seeded per (run seed, step, round): a resumed run draws the same tokens.
Left out: partial rollouts carried across steps, asynchronous generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlad_megatron.types import Sample

ROLLOUTS_DIR = "rollouts"


def step_seed(seed: int, step: int, round_index: int = 0) -> int:
    """Sampling seed of one generation round of one step (the engine derives per-sample seeds from it)."""
    return (seed * 1_000_003 + step * 1_009 + round_index) % (2**31 - 1)


@dataclass
class SourceContext:
    """What a source needs; built once by train.build_run."""

    cfg: Any
    objective: Any
    tokenizer: Any
    sampler: Any
    """PromptSampler over the data package's items `{"prompt_ids": [...], "record": {...}}`."""
    reward_fn: Callable[[str, dict[str, Any]], Any]
    rollout_engine: Any = None
    teacher_engine: Any = None


def sampling_params(cfg, seed: int):
    from rlad_megatron.engines.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=tuple(r.stop_token_ids),
        seed=seed,
    )


def generate_samples(
    ctx: SourceContext, engine, items: Sequence[dict[str, Any]], n: int, seed: int, first_group: int = 0
) -> list[Sample]:
    """n responses per prompt item from `engine`, rewarded; group_index counts from first_group."""
    prompts = [list(item["prompt_ids"]) for item in items]
    outputs = engine.generate(prompts, sampling_params(ctx.cfg, seed), n=n)
    samples = []
    for i, (item, prompt, outs) in enumerate(zip(items, prompts, outputs)):
        for out in outs:
            samples.append(
                Sample(
                    prompt_ids=list(prompt),
                    record=dict(item["record"]),
                    group_index=first_group + i,
                    response_ids=list(out.response_ids),
                    rollout_logprobs=list(out.logprobs),
                    finish_reason=out.finish_reason,
                )
            )
    reward(ctx, samples)
    return samples


def reward(ctx: SourceContext, samples: Sequence[Sample]) -> None:
    """Decode each response and fill reward / reward_details in place (rewards package)."""
    from rlad_megatron.rewards import score_samples

    for sample in samples:
        sample.response_text = ctx.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
    r = ctx.cfg.reward
    score_samples(
        samples,
        ctx.reward_fn,
        length_penalty=r.length_penalty,
        max_new_tokens=ctx.cfg.rollout.max_new_tokens,
        num_workers=r.num_workers,
    )


def _groups(samples: Sequence[Sample]) -> list[list[Sample]]:
    by_group: dict[int, list[Sample]] = {}
    for sample in samples:
        by_group.setdefault(sample.group_index, []).append(sample)
    return [by_group[k] for k in sorted(by_group)]


def _renumber(groups: Sequence[Sequence[Sample]]) -> list[Sample]:
    out = []
    for index, group in enumerate(groups):
        for sample in group:
            sample.group_index = index
            out.append(sample)
    return out


class Source:
    """What a sample source declares; the engines built on rank 0 follow from it (components.py)."""

    needs_teacher = False
    """The source itself generates with the teacher engine."""
    needs_rollout_engine = False
    """The source samples from the student's rollout engine."""
    scored = False
    """Samples arrive with teacher scores already (the loop does not score them again)."""

    def collect(self, ctx: SourceContext, step: int) -> tuple[list[Sample], dict[str, float]]:
        raise NotImplementedError


class StudentRollouts(Source):
    """On-policy: the student's rollout engine answers each prompt group_size times."""

    needs_rollout_engine = True

    def collect(self, ctx: SourceContext, step: int) -> tuple[list[Sample], dict[str, float]]:
        cfg = ctx.cfg
        want, size = cfg.train.prompts_per_step, cfg.algorithm.group_size
        records = ctx.sampler.next_batch(want)
        samples = generate_samples(ctx, ctx.rollout_engine, records, size, step_seed(cfg.seed, step))
        groups = _groups(samples)
        metrics = {"zero_adv_group_frac": sum(map(_zero_adv, groups)) / max(len(groups), 1)}
        if not (cfg.algorithm.dynamic_sampling and ctx.objective.uses_rewards):
            return samples, metrics
        kept = [g for g in groups if not _zero_adv(g)]
        dropped = [g for g in groups if _zero_adv(g)]
        rounds = extra_prompts = 0
        while len(kept) < want and rounds < cfg.algorithm.max_resample_rounds:
            rounds += 1
            records = ctx.sampler.next_batch(want - len(kept))
            extra_prompts += len(records)
            more = _groups(
                generate_samples(
                    ctx,
                    ctx.rollout_engine,
                    records,
                    size,
                    step_seed(cfg.seed, step, rounds),
                    first_group=len(groups) + extra_prompts - len(records),
                )
            )
            kept += [g for g in more if not _zero_adv(g)]
            dropped += [g for g in more if _zero_adv(g)]
        num_dropped = max(len(dropped) - max(want - len(kept), 0), 0)
        # Short of informative groups after every round: fill up with zero-advantage ones (they add no
        # gradient) so the batch keeps its size and the optimizer step stays comparable.
        chosen = (kept + dropped)[:want]
        metrics.update(
            {
                "dynamic_sampling/rounds": rounds,
                "dynamic_sampling/extra_prompts": extra_prompts,
                "dynamic_sampling/dropped_groups": num_dropped,
                "dynamic_sampling/kept_frac": min(len(kept), want) / want,
            }
        )
        return _renumber(chosen), metrics


def _zero_adv(group: Sequence[Sample]) -> bool:
    return len({s.reward for s in group}) == 1


class TeacherTraces(Source):
    """Offline distillation data made on the fly: teacher generations kept when correct."""

    needs_teacher = True

    def collect(self, ctx: SourceContext, step: int) -> tuple[list[Sample], dict[str, float]]:
        cfg = ctx.cfg
        records = ctx.sampler.next_batch(cfg.train.prompts_per_step)
        samples = generate_samples(
            ctx, ctx.teacher_engine, records, cfg.algorithm.group_size, step_seed(cfg.seed, step)
        )
        kept = [s for s in samples if s.reward >= cfg.algorithm.correct_reward_threshold]
        metrics = {
            "teacher_traces/kept_frac": len(kept) / max(len(samples), 1),
            "teacher_traces/reward_mean": sum(s.reward for s in samples) / max(len(samples), 1),
        }
        return kept, metrics


class DatasetTraces(Source):
    """Offline distillation on reference solutions: the row's trace is the response."""

    def __init__(self, trace_fn: Callable[[dict[str, Any]], str]):
        self.trace_fn = trace_fn

    def collect(self, ctx: SourceContext, step: int) -> tuple[list[Sample], dict[str, float]]:
        items = ctx.sampler.next_batch(ctx.cfg.train.prompts_per_step)
        eos = ctx.tokenizer.eos_token_id
        samples = []
        for i, item in enumerate(items):
            ids = ctx.tokenizer.encode(self.trace_fn(item["record"]), add_special_tokens=False) + [eos]
            samples.append(
                Sample(
                    prompt_ids=list(item["prompt_ids"]),
                    record=dict(item["record"]),
                    group_index=i,
                    response_ids=ids,
                    finish_reason="stop",
                )
            )
        reward(ctx, samples)
        return samples, {}


class SavedRollouts(Source):
    """train_only: replay the rollouts a rollout_only (or save_rollouts) run wrote."""

    scored = True  # saved with their rewards and teacher scores

    def __init__(self, rollout_dir: str):
        self.dir = Path(rollout_dir)

    def collect(self, ctx: SourceContext, step: int) -> tuple[list[Sample], dict[str, float]]:
        path = self.dir / f"step_{step}.jsonl"
        if not path.exists():
            raise FileNotFoundError(
                f"train.mode=train_only: {path} is missing; record it with train.mode=rollout_only "
                f"(or train.save_rollouts=true) for at least train.num_steps steps"
            )
        return load_rollouts(path), {}


def save_rollouts(run_dir: str | Path, step: int, samples: Sequence[Sample]) -> Path:
    """<run_dir>/rollouts/step_N.jsonl, written atomically (a kill never leaves a torn file)."""
    out = Path(run_dir) / ROLLOUTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{step}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(s.to_dict(), default=str) + "\n" for s in samples))
    tmp.replace(path)
    return path


def load_rollouts(path: str | Path) -> list[Sample]:
    return [Sample.from_dict(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
