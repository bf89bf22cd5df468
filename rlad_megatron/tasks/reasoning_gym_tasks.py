"""reasoning-gym tasks as prompt records (`reasoning_gym:<task>` data sources).

Each record keeps how to regenerate its reasoning-gym entry (`metadata["reasoning_gym"]`:
task, seed, size, config, index), so the reward scores with reasoning-gym's own
`score_answer(answer, entry)` on exactly the entry the prompt came from. The entry's
`difficulty` metadata is kept (made JSON-safe) for per-difficulty eval breakdowns; the rest of
reasoning-gym's metadata (solver internals) is dropped from the record.

Held-out split: like the procedural tasks, an entry belongs to `test` iff a hash of its question
falls below `heldout_fraction`, so train and eval prompts never overlap for any seeds.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from rlad_megatron.tasks.base import SPLITS, split_of


def json_safe(value: Any) -> Any:
    """numpy scalars -> Python, tuples -> lists, everything else -> str when not JSON-native."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@functools.lru_cache(maxsize=64)
def _dataset(task: str, seed: int, size: int, config_json: str):
    import reasoning_gym

    if task not in reasoning_gym.factory.DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; see reasoning_gym.factory.DATASETS for the names")
    return reasoning_gym.create_dataset(task, seed=seed, size=size, **json.loads(config_json))


def dataset_for(spec: dict[str, Any]):
    """The (cached) reasoning-gym dataset described by a record's `metadata["reasoning_gym"]`."""
    config = json.dumps(spec.get("config") or {}, sort_keys=True)
    return _dataset(spec["task"], int(spec["seed"]), int(spec["size"]), config)


def entry_for(record: dict[str, Any]) -> dict[str, Any] | None:
    """The reasoning-gym entry a record was generated from, or None for records from files."""
    spec = (record.get("metadata") or {}).get("reasoning_gym")
    if not spec:
        return None
    return dataset_for(spec)[int(spec["index"])]


def reasoning_gym_records(
    task: str,
    size: int,
    *,
    seed: int = 0,
    split: str = "train",
    config: dict[str, Any] | None = None,
    configs: list[dict[str, Any]] | None = None,
    heldout_fraction: float = 0.1,
) -> list[dict[str, Any]]:
    """`size` records `{"prompt", "answer", "metadata"}` of one reasoning-gym task and split.

    `configs` (a list of task configs, e.g. K&K with n_people 2..8) mixes them in turn, an equal
    share each; `config` is the single-config form.
    """
    if configs:
        parts = [_records(task, -(-size // len(configs)), seed, split, c, heldout_fraction) for c in configs]
        mixed = [part[i] for i in range(len(parts[0])) for part in parts if i < len(part)]
        return mixed[:size]
    return _records(task, size, seed, split, config, heldout_fraction)


def _records(
    task: str, size: int, seed: int, split: str, config: dict[str, Any] | None, heldout_fraction: float
) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not allowed; choose one of {list(SPLITS)}")
    pool_size = int(size / max(min(heldout_fraction, 1 - heldout_fraction), 0.01)) + 16
    spec = {"task": task, "seed": seed, "size": pool_size, "config": dict(config or {})}
    dataset = dataset_for(spec)
    records = []
    for index in range(pool_size):
        entry = dataset[index]
        if split_of(f"reasoning_gym:{task}:{entry['question']}", heldout_fraction) != split:
            continue
        difficulty = json_safe(entry.get("metadata", {}).get("difficulty", {}))
        metadata = {"task": task, "difficulty": difficulty, "reasoning_gym": dict(spec, index=index)}
        records.append({"prompt": entry["question"], "answer": json_safe(entry["answer"]), "metadata": metadata})
        if len(records) == size:
            return records
    raise ValueError(f"reasoning-gym task {task}: only {len(records)} {split} entries among {pool_size}; lower size")
