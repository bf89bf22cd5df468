"""Reward functions `(response_text, record) -> RewardResult`, a registry, and batch scoring.

Names: `math`, `knights_knaves` (Logic-RL scores), `task:<name>` (procedural tasks),
`reasoning_gym:<task>` (reasoning-gym's own scorer), `auto` (from the data source).
Length shaping (`reward.length_penalty`) is applied by `score_samples`, which knows token counts.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from rlad_megatron.rewards.base import RewardFn, RewardResult
from rlad_megatron.rewards.parent_watch import exit_with_parent

NAMES = ("math", "knights_knaves", "task:<name>", "reasoning_gym:<task>", "auto")


class TaskReward:
    """Picklable wrapper of a procedural task's reward."""

    def __init__(self, task: str, **kwargs: Any) -> None:
        from rlad_megatron.tasks import get_task

        get_task(task)  # fail now on an unknown name
        self.task, self.kwargs = task, kwargs

    def __call__(self, response_text: str, record: dict[str, Any]) -> RewardResult:
        from rlad_megatron.tasks import get_task

        return get_task(self.task).reward(response_text, record, **self.kwargs)


def resolve_reward_name(name: str, data_source: str = "") -> str:
    """`auto` -> `task:<t>` / `reasoning_gym:<t>` from a task data source; other names unchanged."""
    if name != "auto":
        return name
    if data_source.startswith(("task:", "reasoning_gym:")):
        return data_source
    raise ValueError(
        f"reward.name=auto cannot infer a reward from data source {data_source!r}; "
        "set reward.name to math, knights_knaves, task:<name> or reasoning_gym:<task>"
    )


def get_reward_fn(name: str, data_source: str = "", **kwargs: Any) -> RewardFn:
    """The reward function called `name` with its options (e.g. K&K scores, math timeout_s)."""
    name = resolve_reward_name(name, data_source)
    if name == "math":
        from rlad_megatron.rewards.math import MathReward

        return MathReward(**kwargs)
    if name == "knights_knaves":
        from rlad_megatron.rewards.knights_knaves import KnightsKnavesReward

        return KnightsKnavesReward(**kwargs)
    if name.startswith("task:"):
        return TaskReward(name[len("task:") :], **kwargs)
    if name.startswith("reasoning_gym:"):
        from rlad_megatron.rewards.reasoning_gym import ReasoningGymReward

        return ReasoningGymReward(name[len("reasoning_gym:") :], **kwargs)
    raise ValueError(f"unknown reward {name!r}; choose one of {list(NAMES)}")


def build_reward_fn(reward_cfg: Any, data_cfg: Any) -> RewardFn:
    """From the run config's `reward` and `data` sections (timeout_s / num_workers go to math)."""
    name = resolve_reward_name(reward_cfg.name, data_cfg.train)
    kwargs = dict(reward_cfg.kwargs)
    if name == "math":
        kwargs.setdefault("timeout_s", reward_cfg.timeout_s)
        kwargs.setdefault("num_workers", reward_cfg.num_workers)
    elif name.startswith("reasoning_gym:") and data_cfg.task_kwargs.get("config"):
        kwargs.setdefault("config", data_cfg.task_kwargs["config"])
    return get_reward_fn(name, **kwargs)


# Spawned workers hold both ends of the call queue and never see EOF: they watch the trainer instead.
_EXECUTORS: dict[int, ProcessPoolExecutor] = {}


def _executor(num_workers: int) -> ProcessPoolExecutor:
    """One spawned process pool per size, kept for the whole run (spawning costs ~1 s per worker)."""
    if num_workers not in _EXECUTORS:
        _EXECUTORS[num_workers] = ProcessPoolExecutor(
            num_workers, mp_context=get_context("spawn"), initializer=exit_with_parent, initargs=(os.getpid(),)
        )
    return _EXECUTORS[num_workers]


@atexit.register
def _shutdown_executors() -> None:
    for pool in _EXECUTORS.values():
        pool.shutdown(cancel_futures=True)


def _score_all(reward_fn: RewardFn, texts: list[str], records: list[dict], num_workers: int) -> list[RewardResult]:
    if hasattr(reward_fn, "score_batch"):
        return list(reward_fn.score_batch(texts, records))
    if num_workers > 1 and len(texts) > 1:
        chunksize = max(1, len(texts) // (4 * num_workers))
        try:
            return list(_executor(num_workers).map(reward_fn, texts, records, chunksize=chunksize))
        except BrokenProcessPool as err:  # a worker died: drop the pool so the next call starts a fresh one
            _EXECUTORS.pop(num_workers, None)
            raise RuntimeError(
                f"a reward worker process died while scoring ({err}); the pool is restarted next call"
            ) from err
    return [reward_fn(t, r) for t, r in zip(texts, records)]


def score_samples(
    samples: Sequence[Any],
    reward_fn: RewardFn,
    *,
    length_penalty: float = 0.0,
    max_new_tokens: int | None = None,
    num_workers: int = 1,
) -> list[RewardResult]:
    """Fill `sample.reward` / `sample.reward_details` for each Sample (in place) and return the results.

    Shaping: reward = score - length_penalty * len(response_ids) / max_new_tokens; the unshaped score
    stays in details["raw_score"]. num_workers > 1 scores plain functions in spawned processes
    (functions with `score_batch`, like math, parallelise themselves).
    """
    if length_penalty and not max_new_tokens:
        raise ValueError("length_penalty needs max_new_tokens (the response budget) to normalise lengths")
    results = _score_all(reward_fn, [s.response_text for s in samples], [s.record for s in samples], num_workers)
    for sample, result in zip(samples, results):
        details = dict(result.details, raw_score=result.score)
        penalty = (
            length_penalty * len(sample.response_ids) / max_new_tokens if length_penalty and max_new_tokens else 0.0
        )
        if penalty:
            details["length_penalty"] = penalty
        sample.reward, sample.reward_details = result.score - penalty, details
    return results


__all__ = [
    "NAMES",
    "RewardFn",
    "RewardResult",
    "TaskReward",
    "build_reward_fn",
    "get_reward_fn",
    "resolve_reward_name",
    "score_samples",
]
