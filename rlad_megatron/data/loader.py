"""Load, validate and tokenize a prompt dataset before training starts.

Every row is checked (missing field, wrong type, empty prompt, unreadable line, prompt longer
than `data.max_prompt_length` tokens after templating). With `data.bad_rows=error` (default)
one `DatasetError` lists every bad row by file, row and field, with the fix; with `skip` bad
rows are dropped and counted (`PromptDataset.bad_rows`).

Several teachers (`teachers:`, `load_prompts(..., teachers=names)`): each row names its teacher in
`data.teacher_field` (else `data.teacher_default`, else the only teacher); the record keeps the resolved
name as `record["teacher"]`, and a row naming an unknown teacher is a bad row, found here, before any
generation.

Each kept row becomes `{"prompt_ids": [...], "record": {"prompt", "answer", "metadata", "id"}}`,
ready for `rlad_megatron.types.Sample(prompt_ids=..., record=...)`. Procedural and reasoning-gym
sources use their own field names (prompt / answer / metadata); the field mapping applies to files.

Left out: batched tokenization (rows are tokenized one by one so each error names its row) and
system prompts from config (put them in the chat-message prompt or the plain template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rlad_megatron.data.row_readers import BadRow, iter_rows
from rlad_megatron.tasks.reasoning_gym_tasks import json_safe

_ANSWER_TYPES = (str, int, float, bool, list, dict)
_MAX_LISTED = 50


class DatasetError(ValueError):
    """The dataset has bad rows (all listed) or cannot be used as configured."""

    def __init__(self, message: str, bad_rows: Sequence[BadRow] = ()) -> None:
        super().__init__(message)
        self.bad_rows = list(bad_rows)


@dataclass
class PromptDataset:
    source: str
    records: list[dict[str, Any]]
    """`{"prompt_ids": [...], "record": {...}}` per usable row, in file order."""
    num_rows: int = 0
    """Rows read, good and bad."""
    bad_rows: list[BadRow] = field(default_factory=list)
    """Rows dropped under bad_rows=skip."""

    @property
    def num_skipped(self) -> int:
        return len(self.bad_rows)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def _as_ids(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) returns a list, or (transformers 5) a BatchEncoding."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


def encode_prompt(prompt: str | list[dict[str, str]], tokenizer: Any, template: str, plain_template: str) -> list[int]:
    """Token ids of one prompt under the configured template (no special tokens added for plain/none)."""
    if template == "chat":
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return _as_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    if not isinstance(prompt, str):
        raise TypeError(f"template={template!r} needs a string prompt; chat-message prompts need template=chat")
    text = plain_template.format(prompt=prompt) if template == "plain" else prompt
    return _as_ids(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_template(data_cfg: Any, tokenizer: Any) -> None:
    if data_cfg.template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "data.template=chat but the tokenizer has no chat template; "
            "set data.template=plain (with data.plain_template) or data.template=none"
        )
    if data_cfg.template == "plain":
        try:
            data_cfg.plain_template.format(prompt="x")
        except (KeyError, IndexError, ValueError) as err:
            raise DatasetError(
                f"data.plain_template={data_cfg.plain_template!r} is not a valid template ({err!r}); "
                "use {prompt} for the prompt and double other braces ({{ }})"
            ) from None


def _prompt_problem(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return "empty prompt" if not prompt.strip() else None
    if isinstance(prompt, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
    ):
        return "empty prompt" if not any(m["content"].strip() for m in prompt) else None
    return f"wrong type {type(prompt).__name__}: expected a string or a list of {{role, content}} chat messages"


def validate_row(row: dict[str, Any], keys: dict[str, Any], source: str, number: int) -> dict[str, Any] | BadRow:
    """The record of a readable row, or the first problem found as a BadRow."""
    pk, ak, mkeys = keys["prompt"], keys["answer"], keys["metadata"]
    for name in [pk] + ([ak] if ak else []) + list(mkeys):
        if name not in row:
            return BadRow(source, number, name, f"missing field (row has {sorted(map(str, row))[:10]})")
    problem = _prompt_problem(row[pk])
    if problem:
        return BadRow(source, number, pk, problem)
    answer = row[ak] if ak else None
    if ak and (answer is None or not isinstance(answer, _ANSWER_TYPES)):
        return BadRow(
            source, number, ak, f"wrong type {type(answer).__name__}: expected a string, number, list or object"
        )
    if ak and isinstance(answer, str) and not answer.strip():
        return BadRow(source, number, ak, "empty answer")
    # JSON-safe so samples (which carry the record) can be saved to jsonl and sent over HTTP.
    metadata = dict(row["metadata"]) if keys["task"] else {k: json_safe(row[k]) for k in mkeys}
    record = {"prompt": row[pk], "answer": answer, "metadata": metadata, "id": f"{source}:{number}"}
    sk = keys.get("solution")
    if sk and sk in row:  # optional reference response (offline distillation from the user's own traces)
        if not isinstance(row[sk], str) or not row[sk].strip():
            return BadRow(source, number, sk, f"solution must be a non-empty string, got {type(row[sk]).__name__}")
        record["solution"] = row[sk]
    if keys.get("teachers"):
        teacher = teacher_of_row(row, keys, source, number)
        if isinstance(teacher, BadRow):
            return teacher
        record["teacher"] = teacher
    return record


def teacher_of_row(row: dict[str, Any], keys: dict[str, Any], source: str, number: int) -> str | BadRow:
    """The teacher that scores this row: its `data.teacher_field`, else `data.teacher_default`, else the
    only teacher; an unknown (or missing, with no default) teacher is a BadRow naming the fix."""
    names, name_field, default = keys["teachers"], keys["teacher_field"], keys["teacher_default"]
    value = row.get(name_field) if name_field else None
    if value is None or value == "":
        if default or len(names) == 1:
            return str(default or names[0])
        return BadRow(
            source,
            number,
            name_field,
            f"names no teacher and data.teacher_default is empty; give the row one of {list(names)} "
            "or set data.teacher_default",
        )
    if not isinstance(value, str) or value not in names:
        return BadRow(
            source,
            number,
            name_field,
            f"unknown teacher {value!r}; the teachers are {list(names)} (teachers: in the config)",
        )
    return value


def _field_keys(source: str, data_cfg: Any) -> dict[str, Any]:
    if source.startswith(("task:", "reasoning_gym:")):
        return {"prompt": "prompt", "answer": "answer", "metadata": [], "task": True}
    return {
        "prompt": data_cfg.prompt_key,
        "answer": data_cfg.answer_key,
        "metadata": list(data_cfg.metadata_keys),
        "solution": data_cfg.solution_key,
        "task": False,
    }


def _tokenize(record: dict[str, Any], data_cfg: Any, tokenizer: Any, source: str, number: int, key: str):
    try:
        ids = encode_prompt(record["prompt"], tokenizer, data_cfg.template, data_cfg.plain_template)
    except (ValueError, TypeError, KeyError) as err:
        return BadRow(source, number, key, f"cannot apply the {data_cfg.template} template: {err}")
    if len(ids) > data_cfg.max_prompt_length:
        return BadRow(
            source,
            number,
            key,
            f"prompt is {len(ids)} tokens, over data.max_prompt_length={data_cfg.max_prompt_length}",
        )
    return {"prompt_ids": ids, "record": record}


def _error_message(source: str, bad: list[BadRow], num_rows: int) -> str:
    lines = [f"{len(bad)} bad rows of {num_rows} in {source}:"] + [f"  {b}" for b in bad[:_MAX_LISTED]]
    if len(bad) > _MAX_LISTED:
        lines.append(f"  ... and {len(bad) - _MAX_LISTED} more")
    fix = "Fix: correct these rows (or data.prompt_key / answer_key / metadata_keys), or set data.bad_rows=skip to drop and count them"
    if any("max_prompt_length" in b.problem for b in bad):
        fix += "; for long prompts raise data.max_prompt_length"
    return "\n".join(lines + [fix + "."])


def load_prompts(
    source: str, data_cfg: Any, tokenizer: Any, *, split: str = "train", seed: int = 0, teachers: Sequence[str] = ()
) -> PromptDataset:
    """Read, validate and tokenize every row of `source` (a DataConfig supplies mapping and policy).
    `teachers`: the names of a several-teacher run; each record then gets its teacher as record["teacher"]."""
    _check_template(data_cfg, tokenizer)
    keys = _field_keys(source, data_cfg)
    if teachers:
        keys.update(
            teachers=list(teachers),
            teacher_field=getattr(data_cfg, "teacher_field", ""),
            teacher_default=getattr(data_cfg, "teacher_default", ""),
        )
    records: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    num_rows = 0
    rows = iter_rows(
        source,
        split=split,
        seed=seed,
        task_kwargs=data_cfg.task_kwargs,
        dataset_split=getattr(data_cfg, "dataset_split", "train"),
        cache_dir=getattr(data_cfg, "cache_dir", ""),
    )
    for where, number, row in rows:
        num_rows += 1
        result = row if isinstance(row, BadRow) else validate_row(row, keys, where, number)
        if not isinstance(result, BadRow):
            result = _tokenize(result, data_cfg, tokenizer, where, number, keys["prompt"])
        if isinstance(result, BadRow):
            bad.append(result)
        else:
            records.append(result)
    if bad and data_cfg.bad_rows == "error":
        raise DatasetError(_error_message(source, bad, num_rows), bad)
    if not records:
        raise DatasetError(
            f"{source}: no usable rows ({num_rows} read, {len(bad)} bad); check the file and data.prompt_key"
        )
    return PromptDataset(source, records, num_rows, bad)
