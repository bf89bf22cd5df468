"""The outer training loop, readable top to bottom (`train(cfg)`; `rlad train` calls it).

One step:
  1. samples   <- source.collect(step)      prompts -> n rollouts each -> rewards (-> dynamic sampling)
  2. teacher   <- score_samples(...)         teacher log-probs (or top-k) on the student's exact ids; on-policy
                                             sources score each prompt group as soon as it finished generating
  3. (rank 0 drove steps 1-2; every trainer rank now gets the same samples' metadata by broadcast; the
     per-token columns (ids, log-probs, top-k) go as flat tensors, to each rank only for the samples its
     data-parallel rank trains on; the others keep their lengths)
  4. old / ref <- trainer.compute_logprobs   forward-only, before any update of this step
  5. advantages <- objective.token_advantages(rewards, old and teacher log-probs)
  6. update    <- trainer.train_step         ppo_epochs x num_minibatches optimizer steps;
                                             a non-finite loss or gradient skips the update
  7. sync      <- engine.update_weights      HF-named tensors exported from the Megatron shards
  8. metrics, periodic eval, checkpoint (model, optimizer, scheduler, step, RNG, sampler, weights version)
Per-algorithm differences live in the Objective's attributes (`needs_teacher`, `teacher_top_k`,
`needs_old_logprobs`, `needs_ref`, `uses_rewards`) and in the sample source (sample_sources.py); the
loop never tests an algorithm name.

Off-policy overlap (train.max_staleness=1): right after step N's samples are in hand, rank 0 starts
generating step N+1's samples (steps 1-2) on a background thread, with the weights the engine holds then
(version N-1), while steps 4-6 of step N run; step 7 first waits for that generation to end (the engine
syncs only between generations), so step N+1 trains on samples one update old (`staleness` metrics). The
objective corrects for it with truncated importance weights (algorithm.tis_cap, docs/algorithms.md).
A checkpoint holds the finished next-step samples, so a resumed run continues exactly as the
uninterrupted one would have.

Distributed design: rank 0 owns the engines (rollout, teacher, eval) and broadcasts each
step's samples; all ranks run the Megatron step; weights are exported collectively and rank 0
pushes them to its engine. The background generation touches no collective. Determinism: generation
is seeded per (seed, step), so a resumed run on CPU reproduces the uninterrupted run's metrics step
for step.
Left out: more than one step of staleness, partial rollouts carried across a weight sync, colocated GPU
memory swapping.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlad_megatron import components
from rlad_megatron.config import RunConfig, save_config, to_dict
from rlad_megatron.engines.factory import resolve_kind
from rlad_megatron.observe import NullObserver, Observer, PhaseTimer
from rlad_megatron.sample_sources import (
    DatasetTraces,
    SavedRollouts,
    Source,
    SourceContext,
    StudentRollouts,
    TeacherTraces,
    save_rollouts,
)
from rlad_megatron.types import TOKEN_COLUMNS, Sample

if TYPE_CHECKING:
    from rlad_megatron.algorithms.objectives import Objective
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer

HF_DIR = "hf"  # <run_dir>/hf/step_N: final HF export; <run_dir>/hf/latest names it


class ResumeError(ValueError):
    """--resume without a checkpoint, or --no-resume into a folder that holds one."""


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many consecutive non-finite steps); the last good checkpoint stays."""


# Where samples come from, per algorithm: the one table that knows that sft trains off-policy.
OFFLINE_SOURCES: dict[str, dict[str, Callable[[RunConfig], Any]]] = {
    "sft": {"teacher": lambda cfg: TeacherTraces(), "dataset": lambda cfg: DatasetTraces(components.trace_fn(cfg))},
}


def sample_source(cfg: RunConfig):
    if cfg.train.mode == "train_only":
        return SavedRollouts(cfg.train.rollout_dir)
    offline = OFFLINE_SOURCES.get(cfg.algorithm.name)
    return offline[cfg.train.offline_source](cfg) if offline else StudentRollouts()


@dataclasses.dataclass
class Prefetch:
    """One step's samples, generated on rank 0's background thread while the step before trains."""

    step: int
    weights_version: int
    """The rollout engine's weights version when the generation started."""
    sampler_state: dict[str, Any]
    """The prompt sampler before the generation drew its prompts (checkpointed if the generation failed)."""
    result: Future
    """(samples, metrics) of `source.collect`, or its exception."""


@dataclasses.dataclass
class Run:
    cfg: RunConfig
    objective: Objective
    source_ctx: SourceContext
    source: Source
    trainer: MegatronTrainer | None = None
    """None when train.mode is rollout_only."""
    rank: int = 0
    weights_version: int = 0
    eval_records: Sequence[dict[str, Any]] = ()
    weight_wire: Any = None
    """This rank's side of the over-the-wire weight sync (engines/weight_sync.py), built at the first sync."""
    prefetch: Prefetch | None = None
    """train.max_staleness=1, rank 0: the next step's samples, generating or done."""
    generator: ThreadPoolExecutor | None = None
    """The one background thread that runs prefetches."""

    @property
    def active_trainer(self) -> MegatronTrainer:
        """The trainer, for code that runs only when there is one (not train.mode=rollout_only)."""
        if self.trainer is None:
            raise RuntimeError("train.mode=rollout_only builds no trainer, and this step needs one")
        return self.trainer


# ----------------------------------------------------------------------------- the loop
def train(cfg: RunConfig, *, resume: bool | None = None, advantage_hook=None) -> list[dict[str, float]]:
    """Train per `cfg`; returns the logged metrics of every step run. `advantage_hook(step, advantages)`
    may rewrite advantages (tests inject NaN with it)."""
    run = build_run(cfg)
    obs = None
    try:
        start = restore(run, resume)
        obs = (
            Observer(cfg.run_dir, cfg.logging, cfg.train.num_steps, start, run_config=to_dict(cfg))
            if run.rank == 0
            else NullObserver()
        )
        history: list[dict[str, float]] = []
        evaluating = bool(run.eval_records) and cfg.eval.interval > 0  # eval.interval 0: no evaluation at all
        if start == 0 and evaluating:
            obs.log_eval(0, evaluate(run, 0))
        bad_steps = 0
        for step in range(start + 1, cfg.train.num_steps + 1):
            timer = PhaseTimer()
            samples, metrics = collect(run, step, timer)
            if cfg.train.max_staleness and step < cfg.train.num_steps:
                start_prefetch(run, step + 1)  # generates while this step trains, with the engine's weights now
            if run.trainer is not None and samples:
                metrics.update(optimize(run, samples, step, timer, advantage_hook))
                bad_steps = bad_steps + 1 if metrics["skipped"] else 0
                if not bad_steps:
                    if run.prefetch is not None:
                        with timer("prefetch_wait"):
                            wait_for_prefetch(run)  # the engine takes new weights only between generations
                    with timer("sync"):
                        sync_weights(run, step)
            metrics.update(timer.metrics())
            metrics["throughput/tokens_per_s"] = sum(len(s.response_ids) for s in samples) / max(
                metrics["time/step"], 1e-9
            )
            history.append(obs.log_step(step, metrics))
            obs.log_samples(step, samples)
            if bad_steps:
                handle_bad_step(cfg, obs, step, bad_steps)
                continue  # no eval, no checkpoint of a step whose update was skipped
            if evaluating and _due(step, cfg.eval.interval, cfg.train.num_steps):
                obs.log_eval(step, evaluate(run, step))
            if _due(step, cfg.checkpoint.interval, cfg.train.num_steps) and run.trainer is not None:
                checkpoint(run, step)
        finish(run, cfg.train.num_steps)
        return history
    finally:
        if obs is not None:
            obs.close()
        close_prefetch(run)
        components.close(run)


def handle_bad_step(cfg: RunConfig, obs, step: int, bad_steps: int) -> None:
    """Warn about a skipped update; stop once train.max_bad_steps happened in a row."""
    obs.echo(
        f"WARNING step {step}: non-finite loss or gradient; update skipped "
        f"({bad_steps}/{cfg.train.max_bad_steps} consecutive)"
    )
    if bad_steps >= cfg.train.max_bad_steps:
        raise TrainingStopped(
            f"{bad_steps} consecutive non-finite steps (train.max_bad_steps); "
            f"the last good checkpoint in {cfg.run_dir} is kept"
        )


def _due(step: int, interval: int, last: int) -> bool:
    return step == last or (interval > 0 and step % interval == 0)


def collect(run: Run, step: int, timer: PhaseTimer):
    """Steps 1-3: samples with rewards and teacher scores, identical on every rank. With a prefetch for this
    step, rank 0 only waits for it (`time/generate` is then the wait)."""
    samples: list[Sample] = []
    metrics: dict[str, float] = {}
    if run.rank == 0:
        prefetched = run.prefetch is not None and run.prefetch.step == step
        with timer("generate"):
            samples, metrics = generate_with_resync(run, step)
        waited = metrics.pop("time/score_after_generate", 0.0)
        if run.objective.needs_teacher and waited and not prefetched:  # scoring generation did not hide
            timer.seconds["generate"] -= waited
            timer.seconds["score"] = timer.seconds.get("score", 0.0) + waited
        unscored = [s for s in samples if s.teacher_logprobs is None]  # StudentRollouts scores its own groups
        if run.objective.needs_teacher and not run.source.scored and unscored:
            with timer("score"):
                components.score_teacher(run, unscored)
        metrics.update(sample_metrics(run.cfg, samples))
        if run.cfg.train.max_staleness:
            metrics.update(staleness_metrics(samples, trainer_version=step - 1))
        if run.cfg.train.save_rollouts or run.cfg.train.mode == "rollout_only":
            save_rollouts(run.cfg.run_dir, step, samples)
    else:
        wait_for_samples(run)
    wanted = (lambda light: columns_needed(run, light)) if run.trainer is not None else None
    device = run.trainer.parallel.device if run.trainer is not None else None
    return components.broadcast_samples(samples, run.rank, columns_wanted=wanted, device=device), metrics


def columns_needed(run: Run, samples: Sequence[Sample]) -> dict[str, list[int]]:
    """Per per-token column, the indices of the samples whose values this rank reads: its data-parallel share
    of every minibatch (the trainer splits each minibatch with the same function), plus, for the token ids
    only, its share of the whole step when forward-only log-probs (old / ref) are computed over all samples."""
    from rlad_megatron.backends.megatron.batching import split_for_data_parallel

    c = run.active_trainer.parallel

    def share(index: list[int]) -> list[int]:
        return [index[j] for j in split_for_data_parallel([samples[i] for i in index], c.data_parallel_size)[c.dp_rank]]

    trained = sorted({i for index in minibatches(samples, run.cfg.train.num_minibatches) for i in share(index)})
    scored = share(list(range(len(samples)))) if run.objective.needs_old_logprobs or run.objective.needs_ref else []
    ids = sorted(set(trained) | set(scored))  # the token ids are all that forward-only log-probs read
    return {name: ids if name in ("prompt_ids", "response_ids") else trained for name in TOKEN_COLUMNS}


def generate_with_resync(run: Run, step: int, attempts: int = 3):
    """Rank 0's samples, each stamped with the weights version that generated it: the prefetched ones when a
    prefetch of this step exists, else generated now. When every rollout server restarted since the last
    weight sync (each answers with older weights), rank 0 says so to the other ranks, all of them push the
    current weights again (the sync rebuilds its groups with the restarted servers) and generation is
    retried; the other ranks take part from `wait_for_samples`."""
    from rlad_megatron.engines.client import StaleWeightsError

    prefetch, run.prefetch = run.prefetch, None
    for attempt in range(attempts):
        try:
            if prefetch is not None and prefetch.step == step and attempt == 0:
                version = prefetch.weights_version
                samples, metrics = prefetch.result.result()
            else:
                version = run.weights_version
                samples, metrics = run.source.collect(run.source_ctx, step)
        except StaleWeightsError as err:
            if attempt == attempts - 1 or run.trainer is None:
                raise
            print(f"step {step}: {err}; syncing weights version {run.weights_version} again", flush=True)
            components.broadcast(RESYNC, run.rank)
            sync_weights(run, run.weights_version)
            continue
        components.broadcast(None, run.rank)  # no resync needed: the other ranks go on to the samples
        for sample in samples:
            sample.weights_version = version
        return samples, metrics
    raise AssertionError("unreachable")


def start_prefetch(run: Run, step: int) -> None:
    """train.max_staleness=1, rank 0: generate `step`'s samples on the background thread, with the weights
    the rollout engine holds now; the loop takes them at `step` (generate_with_resync). No collectives."""
    if run.rank != 0:
        return
    if run.generator is None:
        run.generator = ThreadPoolExecutor(1, thread_name_prefix="rlad-prefetch")
    sampler_state = run.source_ctx.sampler.state_dict()
    started = time.perf_counter()

    def generate():
        samples, metrics = run.source.collect(run.source_ctx, step)
        metrics["time/generate_background"] = time.perf_counter() - started
        return samples, metrics

    run.prefetch = Prefetch(step, run.weights_version, sampler_state, run.generator.submit(generate))


def wait_for_prefetch(run: Run) -> None:
    """Until the background generation has ended (the engine is then idle: a clean point for a weight sync or
    an eval); its samples or its error are taken at its step."""
    if run.prefetch is not None:
        wait_for_futures([run.prefetch.result])


def close_prefetch(run: Run | None) -> None:
    """At the end of a run (or on an error): let a running generation end, then stop the thread."""
    if run is not None and run.generator is not None:
        wait_for_prefetch(run)
        run.generator.shutdown(wait=True)
        run.generator = None


def staleness_metrics(samples: Sequence[Sample], trainer_version: int) -> dict[str, float]:
    """Updates between the weights that generated each sample and those this step's update starts from."""
    lags = [trainer_version - s.weights_version for s in samples if s.weights_version is not None]
    return {"staleness/mean": float(np.mean(lags)), "staleness/max": float(max(lags))} if lags else {}


def wait_for_samples(run: Run) -> None:
    """Ranks other than 0 during generation: join every resync rank 0 asks for."""
    while components.broadcast(None, run.rank) == RESYNC:
        sync_weights(run, run.weights_version)


RESYNC = "resync-weights"


def sample_metrics(cfg: RunConfig, samples: Sequence[Sample]) -> dict[str, float]:
    if not samples:
        return {"num_samples": 0.0}
    rewards = np.array([s.reward for s in samples], dtype=np.float64)
    lengths = np.array([len(s.response_ids) for s in samples], dtype=np.float64)
    correct = [
        bool(s.reward_details.get("correct", s.reward >= cfg.algorithm.correct_reward_threshold)) for s in samples
    ]
    return {
        "reward/mean": rewards.mean(),
        "reward/std": rewards.std(),
        "accuracy": float(np.mean(correct)),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "truncated_frac": float(np.mean([s.finish_reason == "length" for s in samples])),
        "num_samples": float(len(samples)),
    } | (per_teacher_metrics(cfg, samples) if cfg.teachers else {})


def per_teacher_metrics(cfg: RunConfig, samples: Sequence[Sample]) -> dict[str, float]:
    """Several teachers: per teacher, its share of the samples, their mean reward and the mean teacher
    log-prob per response token (when scored): teacher/<name>/frac, /reward_mean, /logprob_mean."""
    from rlad_megatron.sample_sources import teacher_name

    metrics: dict[str, float] = {}
    for name in cfg.teachers:
        mine = [s for s in samples if teacher_name(s) == name]
        metrics[f"teacher/{name}/frac"] = len(mine) / len(samples)
        if not mine:
            continue
        metrics[f"teacher/{name}/reward_mean"] = float(np.mean([s.reward for s in mine]))
        scored = [lp for s in mine if s.teacher_logprobs is not None for lp in s.teacher_logprobs]
        if scored:
            metrics[f"teacher/{name}/logprob_mean"] = float(np.mean(scored))
    return metrics


def optimize(run: Run, samples: list[Sample], step: int, timer: PhaseTimer, advantage_hook=None) -> dict[str, float]:
    """Steps 4-6: old / ref log-probs, advantages, ppo_epochs x num_minibatches optimizer steps."""
    objective, trainer, cfg = run.objective, run.active_trainer, run.cfg
    with timer("logprobs"):
        old = trainer.compute_logprobs(samples, which="old") if objective.needs_old_logprobs else None
        routing = trainer.routing_agreement() if old is not None else {}  # routing replay only
        ref = trainer.compute_logprobs(samples, which="ref") if objective.needs_ref else None
    advantages = compute_advantages(run, samples, old, step)
    if advantage_hook is not None:
        advantages = advantage_hook(step, advantages)
    metrics: dict[str, float] = dict(routing)
    with timer("train"):
        for _epoch in range(cfg.train.ppo_epochs):
            for index in minibatches(samples, cfg.train.num_minibatches):
                out = trainer.train_step(
                    [samples[i] for i in index],
                    [advantages[i] for i in index],
                    step,
                    old_logprobs=_pick(old, index),
                    ref_logprobs=_pick(ref, index),
                )
                _accumulate(metrics, out)
    metrics.update(objective.step_scalars(step))
    if run.rank == 0:  # the only rank that holds every sample's log-probs (and logs metrics)
        metrics.update(_logprob_metrics(samples, old))
    return metrics


def _pick(values: list[Any] | None, index: Sequence[int]) -> list[Any] | None:
    return None if values is None else [values[i] for i in index]


def compute_advantages(
    run: Run, samples: Sequence[Sample], old: list[list[float]] | None, step: int
) -> list[list[float] | None]:
    objective = run.objective
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32) if objective.uses_rewards else None
    per_seq = objective.token_advantages(
        rewards,
        run.cfg.algorithm.group_size if objective.uses_rewards else 1,
        seq_lens=[len(s.response_ids) for s in samples],
        old_logprobs=old,
        # None: another data-parallel rank trains on that sample, and only it received its teacher log-probs
        teacher_logprobs=[s.teacher_logprobs if s.holds("teacher_logprobs") else None for s in samples]
        if objective.needs_teacher
        else None,
        ends_with_eos=[s.ends_with_stop_token for s in samples],
        step=step,
    )
    return [None if a is None else a.tolist() for a in per_seq]


def minibatches(samples: Sequence[Sample], num_minibatches: int) -> list[list[int]]:
    """Sample indices of each minibatch; whole groups stay together (their advantages are relative)."""
    groups: dict[int, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(sample.group_index, []).append(i)
    ordered = [groups[k] for k in sorted(groups)]
    count = max(1, min(num_minibatches, len(ordered)))
    return [[i for g in ordered[m::count] for i in g] for m in range(count)]


def _accumulate(metrics: dict[str, float], out: dict[str, float]) -> None:
    """Means over the optimizer steps of one RL step; `skipped` is 1 if any update was skipped."""
    n = metrics.get("optimizer_steps", 0.0) + 1
    for key, value in out.items():
        if key == "skipped":
            metrics[key] = max(metrics.get(key, 0.0), float(value))
        else:
            metrics[key] = metrics.get(key, 0.0) + (float(value) - metrics.get(key, 0.0)) / n
    metrics["optimizer_steps"] = n


def _logprob_metrics(samples: Sequence[Sample], old: list[list[float]] | None) -> dict[str, float]:
    """Rollout-vs-trainer mismatch and student-vs-teacher gap on the sampled tokens (k1 / k3 KL estimates)."""
    out: dict[str, float] = {}
    pairs = {
        "rollout_vs_old": ([s.rollout_logprobs for s in samples], old),
        "old_vs_teacher": (old, [s.teacher_logprobs for s in samples]),
    }
    for name, (first, second) in pairs.items():
        if first is None or second is None:
            continue
        diff = np.array([x - y for a, b in zip(first, second) if a and b for x, y in zip(a, b)])
        if diff.size:  # log p_a - log p_b on tokens sampled from p_a
            out[f"kl/{name}_k1"] = float(diff.mean())
            out[f"kl/{name}_max_abs"] = float(np.abs(diff).max())
            out[f"kl/{name}_k3"] = float(np.mean(np.exp(-diff) + diff - 1.0))
    return out


# ----------------------------------------------------------------------------- weights, eval, checkpoints
def sync_weights(run: Run, step: int) -> None:
    """Step 7: Megatron shards -> HF-named tensors -> rollout engine (collective export, rank 0 loads)."""
    if not components.wants_rollout_engine(run.cfg, run.source):
        return
    components.push_weights(run, version=step)
    run.weights_version = step


def evaluate(run: Run, step: int) -> dict[str, float]:
    return components.evaluate(run, step) if run.rank == 0 else {}


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as plain lists / ints (safe for any checkpoint loader)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def checkpoint(run: Run, step: int) -> None:
    extra = {
        "step": step,
        "rng": rng_state(),
        "sampler": run.source_ctx.sampler.state_dict(),
        "weights_version": run.weights_version,
    }
    if run.prefetch is not None:
        extra.update(prefetch_state(run.prefetch))
    components.save(run, step, components.broadcast(extra, run.rank))  # rank 0 drives sampling: its state is the run's


def prefetch_state(prefetch: Prefetch) -> dict[str, Any]:
    """What a checkpoint keeps of the next step's (finished) background generation: its samples and metrics,
    so a resumed run trains on exactly them; if it failed, the sampler as it was before it, so a resumed run
    generates that step again."""
    error = prefetch.result.exception()
    if error is not None:
        return {"sampler": prefetch.sampler_state}
    samples, metrics = prefetch.result.result()
    return {
        "prefetched": {
            "step": prefetch.step,
            "weights_version": prefetch.weights_version,
            "samples": [s.to_dict() for s in samples],
            "metrics": dict(metrics),
        }
    }


def restore_prefetch(run: Run, state: dict[str, Any]) -> None:
    """The checkpointed next-step samples become the pending prefetch (rank 0 generates; the others get them
    by broadcast)."""
    if run.rank != 0:
        return
    done: Future = Future()
    done.set_result(([Sample.from_dict(s) for s in state["samples"]], dict(state["metrics"])))
    run.prefetch = Prefetch(int(state["step"]), int(state["weights_version"]), {}, done)


def restore(run: Run, resume: bool | None) -> int:
    """Step of the latest complete checkpoint (0 for a fresh run); reloads everything it holds."""
    found = components.load(run) if resume is not False else None
    if resume is False and components.has_checkpoint(run):
        raise ResumeError(f"{run.cfg.run_dir} already holds checkpoints; resume (the default) or pick a new run_dir")
    if found is None:
        if resume:
            raise ResumeError(f"--resume: no complete checkpoint in {run.cfg.run_dir}")
        if run.trainer is not None and resolve_kind(run.cfg.rollout) != "embedded":
            sync_weights(run, 0)  # servers that outlived an earlier run may hold its weights, not this student's
        return 0
    step, extra = found
    run.source_ctx.sampler.load_state_dict(extra["sampler"])
    set_rng_state(extra["rng"])
    sync_weights(run, extra.get("weights_version", step))
    if "prefetched" in extra:
        restore_prefetch(run, extra["prefetched"])
    return int(step)


def finish(run: Run, step: int) -> Path | None:
    """The final student as an HF folder `<run_dir>/hf/step_N` (`rlad eval`, the next run, release)."""
    if run.cfg.checkpoint.save_hf and run.trainer is not None:
        return components.save_hf(run, Path(run.cfg.run_dir) / HF_DIR, step)
    return None


# ----------------------------------------------------------------------------- construction
def build_run(cfg: RunConfig) -> Run:
    """Seed, objective, data, reward, engines (rank 0) and the Megatron trainer."""
    from rlad_megatron.algorithms.objectives import build_objective

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    objective = build_objective(cfg.algorithm)
    source = sample_source(cfg)
    trainer = components.build_trainer(cfg, objective) if cfg.train.mode != "rollout_only" else None
    try:
        rank = components.rank()
        if rank == 0:
            save_config(cfg)
        source_ctx = components.build_source_context(cfg, objective, source, with_engines=rank == 0)
        run = Run(cfg=cfg, objective=objective, source_ctx=source_ctx, source=source, trainer=trainer, rank=rank)
        run.eval_records = components.eval_records(cfg) if rank == 0 and cfg.train.mode == "full" else ()
    except BaseException:  # e.g. a bad data row: free the process groups before the error leaves
        if trainer is not None:
            components.release_trainer(trainer)
        raise
    return run
