"""Raw rows from every kind of prompt source, each tagged with where it came from.

Sources: a `.jsonl` file (one JSON object per line; blank lines are ignored), a `.parquet`
file, a `datasets` folder (`save_to_disk` output, or a folder of data files that
`datasets.load_dataset` understands; read offline with a local cache dir), `task:<name>`
(procedural tasks) and `reasoning_gym:<task>`. Rows are numbered from 1 (jsonl: the line number).

A row that cannot even be read (non-UTF-8 bytes, malformed JSON, not an object) is yielded as a
`BadRow` instead of raising, so the loader can report every bad row at once.

Left out: streaming / remote datasets (every row is read, so every bad row can be reported
before training), CSV, and hub downloads (folders are read offline).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BadRow:
    source: str
    """File (or task source) the row came from."""
    row: int
    """1-based row number (the line number for jsonl)."""
    field: str
    """The offending field, or '<row>' when the row itself is unreadable."""
    problem: str
    """What is wrong, in words."""

    def __str__(self) -> str:
        return f"{self.source}:{self.row}: field {self.field!r}: {self.problem}"


Row = tuple[str, int, dict[str, Any] | BadRow]


def _decode_json_line(source: str, number: int, raw: bytes) -> dict[str, Any] | BadRow:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return BadRow(
            source, number, "<row>", f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
        )
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        return BadRow(source, number, "<row>", f"malformed JSON ({getattr(err, 'msg', err)})")
    if not isinstance(value, dict):
        return BadRow(source, number, "<row>", f"a JSON {type(value).__name__}, expected an object with named fields")
    return value


def iter_jsonl(path: Path) -> Iterator[Row]:
    source = str(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield source, number, _decode_json_line(source, number, raw.rstrip(b"\r\n"))


def iter_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield str(path), number, row


def iter_datasets_folder(path: Path, split: str, cache_dir: str) -> Iterator[Row]:
    import datasets

    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path}: no split {split!r}; it has {sorted(loaded)}; set data.dataset_split")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir or str(path / ".cache"))
    for number, row in enumerate(loaded, start=1):
        yield f"{path}[{split}]", number, dict(row)


def iter_task(source: str, split: str, seed: int, task_kwargs: dict[str, Any]) -> Iterator[Row]:
    kwargs = dict(task_kwargs)
    size = int(kwargs.pop("size", 1000))
    kind, _, name = source.partition(":")
    if kind == "task":
        from rlad_megatron.tasks import task_records

        records = task_records(name, size, seed=seed, split=split, **kwargs)
    else:
        from rlad_megatron.tasks.reasoning_gym_tasks import reasoning_gym_records

        records = reasoning_gym_records(name, size, seed=seed, split=split, **kwargs)
    for number, record in enumerate(records, start=1):
        yield source, number, record


def iter_rows(
    source: str,
    *,
    split: str = "train",
    seed: int = 0,
    task_kwargs: dict[str, Any] | None = None,
    dataset_split: str = "train",
    cache_dir: str = "",
) -> Iterator[Row]:
    """(source, row number, row dict or BadRow) for every row of `source`.

    `split` (train/test) selects the procedural / reasoning-gym split; `dataset_split` the split
    of a `datasets` folder.
    """
    if source.startswith(("task:", "reasoning_gym:")):
        return iter_task(source, split, seed, task_kwargs or {})
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"data source {source!r} does not exist; give a .jsonl/.parquet file, a datasets "
            "folder, task:<name> or reasoning_gym:<task>"
        )
    if path.is_dir():
        return iter_datasets_folder(path, dataset_split, cache_dir)
    if path.suffix == ".jsonl":
        return iter_jsonl(path)
    if path.suffix == ".parquet":
        return iter_parquet(path)
    raise ValueError(f"data source {source!r}: unsupported file type {path.suffix!r}; use .jsonl, .parquet or a folder")
