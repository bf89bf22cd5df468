"""Procedural tasks (tiny-model CPU demo and tests) and the reasoning-gym adapter.

`get_task(name)` returns a `Task` (generate / solution_trace / reward / alphabet);
`task_records(name, size=..., seed=..., split=...)` is what the data loader calls.
"""

from __future__ import annotations

from typing import Any

from rlad_megatron.tasks.arithmetic import AdditionTask, MultiplicationTask
from rlad_megatron.tasks.base import SPLITS, Task, split_of

TASKS: dict[str, Task] = {t.name: t for t in (AdditionTask(), MultiplicationTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (or use reasoning_gym:<task>)")
    return TASKS[name]


def task_records(
    name: str, size: int = 1000, *, seed: int = 0, split: str = "train", **kwargs: Any
) -> list[dict[str, Any]]:
    """Records of a procedural task; kwargs: difficulties (list of ints), heldout_fraction."""
    return get_task(name).generate(size, seed=seed, split=split, **kwargs)


def solution_trace(record: dict[str, Any]) -> str:
    """Teacher-style trace + final answer of a procedural-task record (for SFT)."""
    return get_task(record["metadata"]["task"]).solution_trace(record)


__all__ = ["SPLITS", "TASKS", "Task", "get_task", "solution_trace", "split_of", "task_records"]
