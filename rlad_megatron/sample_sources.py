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
StudentRollouts hands each prompt group to a GroupScorer (rewards, teacher scores) as soon as the group has
finished generating (train.stream_scoring), so the teacher works while the rollout engine still generates.
A source runs on the loop's thread, or, with train.max_staleness=1, on rank 0's prefetch thread while the
trainer works (train.py:start_prefetch): it touches only the engines, the sampler and the reward, never a
collective.
Several teachers (`teachers:`): each group goes to the engine of the teacher its record names
(record["teacher"], set by the data loader); groups of different teachers are scored at the same time.
Left out: partial rollouts carried across a weight sync.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlad_megatron.types import Sample

if TYPE_CHECKING:
    from rlad_megatron.algorithms.objectives import Objective
    from rlad_megatron.config import RunConfig
    from rlad_megatron.data.sampler import PromptSampler
    from rlad_megatron.engines.base import Engine

ROLLOUTS_DIR = "rollouts"


def step_seed(seed: int, step: int, round_index: int = 0) -> int:
    """Sampling seed of one generation round of one step (the engine derives per-sample seeds from it)."""
    return (seed * 1_000_003 + step * 1_009 + round_index) % (2**31 - 1)


@dataclass
class SourceContext:
    """What a source needs; built once by train.build_run."""

    cfg: RunConfig
    objective: Objective
    tokenizer: Any
    """The student's Hugging Face tokenizer."""
    sampler: PromptSampler
    """PromptSampler over the data package's items `{"prompt_ids": [...], "record": {...}}`."""
    reward_fn: Callable[[str, dict[str, Any]], Any]
    rollout_engine: Engine | None = None
    teacher_engine: Engine | None = None
    """The teacher of a `teacher:` run."""
    teacher_engines: dict[str, Engine] = field(default_factory=dict)
    """Several teachers (`teachers:`): each teacher's engine by name (teacher_engine is then None)."""

    def engines_by_teacher(self) -> dict[str, Engine]:
        """{teacher name: engine}; the single teacher is named SINGLE_TEACHER ('')."""
        from rlad_megatron.config import SINGLE_TEACHER

        if self.teacher_engines:
            return dict(self.teacher_engines)
        return {SINGLE_TEACHER: self.teacher_engine} if self.teacher_engine is not None else {}


def teacher_name(sample: Sample) -> str:
    """The teacher that scores `sample`: record["teacher"] (several teachers), else the single one ('')."""
    from rlad_megatron.config import SINGLE_TEACHER

    return str(sample.record.get("teacher", SINGLE_TEACHER))


def score_with_teachers(engines: dict[str, Any], samples: Sequence[Sample], top_k: int, drop_final_eos: bool) -> None:
    """Teacher scores of `samples`, each by its own teacher: one `score_samples` call per teacher, the
    teachers at the same time (one thread each; a single teacher runs on the calling thread)."""
    from concurrent.futures import ThreadPoolExecutor

    from rlad_megatron.teacher import score_samples

    by_teacher: dict[str, list[Sample]] = {}
    for sample in samples:
        by_teacher.setdefault(teacher_name(sample), []).append(sample)
    for name in by_teacher:
        _check_teacher(engines, name)
    if len(by_teacher) == 1:
        [(name, group)] = by_teacher.items()
        score_samples(engines[name], group, top_k=top_k, drop_final_eos=drop_final_eos)
        return
    with ThreadPoolExecutor(len(by_teacher), thread_name_prefix="rlad-teacher") as pool:
        futures = [
            pool.submit(score_samples, engines[name], group, top_k=top_k, drop_final_eos=drop_final_eos)
            for name, group in by_teacher.items()
        ]
        for future in futures:
            future.result()


def _check_teacher(engines: dict[str, Any], name: str) -> None:
    if name not in engines:
        raise KeyError(
            f"a sample names teacher {name!r} but the run's teachers are {sorted(engines)}; "
            "the data loader routes each row to one of `teachers:` (data.teacher_field)"
        )


def sampling_params(cfg, seed: int):
    from rlad_megatron.engines.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        max_new_tokens=r.max_new_tokens,
        stop_token_ids=tuple(r.stop_token_ids),
        ignore_eos=r.ignore_eos,
        seed=seed,
        return_routed_experts=cfg.model.routing_replay,
    )


def generate_samples(
    ctx: SourceContext,
    engine,
    items: Sequence[dict[str, Any]],
    n: int,
    seed: int,
    first_group: int = 0,
    scorer: GroupScorer | None = None,
) -> list[Sample]:
    """n responses per prompt item from `engine`, rewarded; group_index counts from first_group.

    With a `scorer`, each prompt's group is handed to it (rewards, teacher scores) as soon as its last sample
    finishes generating when the scorer streams, else once generation returns; without one, rewards only."""
    prompts = [list(item["prompt_ids"]) for item in items]
    groups: list[list[Sample] | None] = [None] * len(items)
    finished: list[dict[int, Any]] = [{} for _ in items]
    lock = threading.Lock()

    def make_group(i: int, outs) -> list[Sample]:
        return [
            Sample(
                prompt_ids=list(prompts[i]),
                record=dict(items[i]["record"]),
                group_index=first_group + i,
                response_ids=list(out.response_ids),
                rollout_logprobs=list(out.logprobs),
                finish_reason=out.finish_reason,
                routed_experts=out.routed_experts,
            )
            for out in outs
        ]

    def on_sample(i: int, s: int, out) -> None:  # engine thread: build the group, hand it over, return
        with lock:
            finished[i][s] = out
            if len(finished[i]) < n:
                return
            group = groups[i] = make_group(i, [finished[i][k] for k in range(n)])
        assert scorer is not None  # on_sample is passed only when streaming, which needs a scorer
        scorer.submit(group)

    streaming = scorer is not None and scorer.streaming
    outputs = engine.generate(
        prompts, sampling_params(ctx.cfg, seed), n=n, **({"on_sample": on_sample} if streaming else {})
    )
    generated_at = time.perf_counter()
    for i, outs in enumerate(outputs):
        if groups[i] is None:
            group = groups[i] = make_group(i, outs)
            if scorer is not None:
                scorer.submit(group)
    samples = [sample for group in groups if group is not None for sample in group]
    if scorer is None:
        reward(ctx, samples)
    else:
        scorer.wait(since=generated_at)
    return samples


class GroupScorer:
    """Rewards and teacher scores of a step's samples, one prompt group at a time.

    A group (the group_size responses of one prompt) is the unit of work: its rewards, then one teacher
    `score` call with its responses. `streaming` (train.stream_scoring) hands each group over as soon as its
    last response finishes generating, so rewards and teacher scoring run on worker threads while the rest
    still generates; otherwise groups are handed over once generation returns. The teacher's answer for a
    sequence depends on which sequences share its batch (padding, kernel shapes), and the batch is always
    exactly one group, so both modes give the same samples and scores bit for bit.

    With dynamic sampling, a group whose rewards are all equal is not sent to the teacher (it is likely
    dropped); `score_missing` scores the ones that were kept after all, in the same per-group calls.
    """

    workers = 8
    """Groups scored at once (concurrent requests to an HTTP teacher fleet; an in-process engine takes one)."""

    def __init__(self, ctx: SourceContext, streaming: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.ctx, self.streaming = ctx, streaming
        self.engines = ctx.engines_by_teacher()
        self.teacher = bool(ctx.objective.needs_teacher and self.engines)
        self.skip_zero_adv = bool(ctx.cfg.algorithm.dynamic_sampling and ctx.objective.uses_rewards)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="rlad-group-scorer")
        self.pending: list[Any] = []
        self.reward_lock = threading.Lock()  # reward functions and their worker pools are not assumed thread-safe
        self.after_generate_s = 0.0
        """Seconds spent waiting for rewards and teacher scores after generation returned (the exposed part)."""

    def submit(self, group: list[Sample]) -> None:
        self.pending.append(self.pool.submit(self._score, group))

    def _score(self, group: list[Sample]) -> None:
        with self.reward_lock:
            reward(self.ctx, group)
        if self.teacher and not (self.skip_zero_adv and _zero_adv(group)):
            self._teacher(group)

    def _teacher(self, group: Sequence[Sample]) -> None:
        """One `score` call with the group's responses, to the group's own teacher (one prompt, one teacher)."""
        from rlad_megatron.teacher import score_samples

        name = teacher_name(group[0])
        _check_teacher(self.engines, name)
        score_samples(
            self.engines[name],
            group,
            top_k=self.ctx.objective.teacher_top_k,
            drop_final_eos=self.ctx.cfg.algorithm.drop_final_eos_from_teacher,
        )

    def wait(self, since: float | None = None) -> None:
        """Until every handed-over group is done; re-raises the first failure."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()
        if since is not None:
            self.after_generate_s += time.perf_counter() - since

    def score_missing(self, groups: Sequence[Sequence[Sample]]) -> None:
        """Teacher scores for kept groups that were skipped (dynamic sampling filler)."""
        if not self.teacher:
            return
        start = time.perf_counter()
        for group in groups:
            if group and group[0].teacher_logprobs is None:
                self.pending.append(self.pool.submit(self._teacher, group))
        self.wait()
        self.after_generate_s += time.perf_counter() - start

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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
        scorer = GroupScorer(ctx, streaming=ctx.cfg.train.stream_scoring)
        try:
            samples, metrics = self._collect(ctx, step, scorer)
        finally:
            scorer.close()
        metrics["time/score_after_generate"] = scorer.after_generate_s
        return samples, metrics

    def _collect(self, ctx: SourceContext, step: int, scorer: GroupScorer) -> tuple[list[Sample], dict[str, float]]:
        cfg = ctx.cfg
        want, size = cfg.train.prompts_per_step, cfg.algorithm.group_size
        records = ctx.sampler.next_batch(want)
        samples = generate_samples(ctx, ctx.rollout_engine, records, size, step_seed(cfg.seed, step), scorer=scorer)
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
                    scorer=scorer,
                )
            )
            kept += [g for g in more if not _zero_adv(g)]
            dropped += [g for g in more if _zero_adv(g)]
        num_dropped = max(len(dropped) - max(want - len(kept), 0), 0)
        # Short of informative groups after every round: fill up with zero-advantage ones (they add no
        # gradient) so the batch keeps its size and the optimizer step stays comparable.
        chosen = (kept + dropped)[:want]
        scorer.score_missing(chosen)
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
