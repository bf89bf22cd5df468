"""Evaluate a policy: k samples per prompt through the Engine interface, scored by a reward function.

`evaluate(...)` is what both `rlad eval` and the training loop's periodic eval call. Correctness
is the reward's `details["correct"]` (not the shaped score), so avg@k / pass@k mean "final
answer right" for every reward. Response length is in tokens (EOS included when emitted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlad_megatron.eval.metrics import by_metadata, ks_to_report, summarize
from rlad_megatron.rewards import score_samples
from rlad_megatron.types import Sample


def _generate(engine: Any, records: Sequence[dict[str, Any]], sampling: Any, k: int) -> list[list[Any]]:
    outputs = engine.generate([r["prompt_ids"] for r in records], sampling, n=k)
    if len(outputs) != len(records) or any(len(o) != k for o in outputs):
        raise RuntimeError(f"engine returned {[len(o) for o in outputs]} samples for {len(records)} prompts x k={k}")
    return outputs


def _samples(records: Sequence[dict[str, Any]], outputs: list[list[Any]], tokenizer: Any, offset: int) -> list[Sample]:
    samples = []
    for i, (rec, outs) in enumerate(zip(records, outputs)):
        for out in outs:
            samples.append(
                Sample(
                    prompt_ids=list(rec["prompt_ids"]),
                    record=rec["record"],
                    group_index=offset + i,
                    response_ids=list(out.response_ids),
                    rollout_logprobs=list(out.logprobs),
                    finish_reason=out.finish_reason,
                    response_text=tokenizer.decode(out.response_ids, skip_special_tokens=True),
                )
            )
    return samples


def _per_prompt(chunk: Sequence[dict[str, Any]], samples: list[Sample], k: int, start: int) -> list[dict[str, Any]]:
    rows = []
    for j, rec in enumerate(chunk):
        group = samples[j * k : (j + 1) * k]
        rows.append(
            {
                "id": rec["record"].get("id", str(start + j)),
                "metadata": rec["record"].get("metadata") or {},
                "num_correct": sum(bool(s.reward_details.get("correct")) for s in group),
                "rewards": [s.reward for s in group],
                "lengths": [len(s.response_ids) for s in group],
            }
        )
    return rows


def _example(s: Sample) -> dict[str, Any]:
    return {
        "prompt": s.record.get("prompt"),
        "response": s.response_text,
        "reward": s.reward,
        "correct": bool(s.reward_details.get("correct")),
    }


def evaluate(
    engine: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    reward_fn: Any,
    *,
    k: int,
    sampling: Any,
    batch_size: int = 64,
    breakdown_keys: Sequence[str] = ("difficulty",),
    max_prompts: int = 0,
    keep_samples: int = 0,
) -> dict[str, Any]:
    """avg@k, pass@j (j = 1, 2, 4, .., k), mean reward / response length, overall and per metadata value.

    records: `{"prompt_ids", "record"}` items (a PromptDataset works). Returns a JSON-ready dict with
    `overall`, `breakdown` ({path: {value: metrics}}), `finish_reasons` and up to `keep_samples`
    example responses.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    records = list(records)[: max_prompts or None]
    if not records:
        raise ValueError("evaluate needs at least one prompt record")
    per_prompt: list[dict[str, Any]] = []
    finish: dict[str, int] = {}
    examples: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        samples = _samples(chunk, _generate(engine, chunk, sampling, k), tokenizer, start)
        score_samples(samples, reward_fn)
        per_prompt.extend(_per_prompt(chunk, samples, k, start))
        for s in samples:
            finish[s.finish_reason] = finish.get(s.finish_reason, 0) + 1
        examples.extend(_example(s) for s in samples[: max(keep_samples - len(examples), 0)])
    return {
        "k": k,
        "overall": summarize(per_prompt, k),
        "breakdown": by_metadata(per_prompt, list(breakdown_keys), k),
        "finish_reasons": finish,
        "per_prompt": [{"id": p["id"], "num_correct": p["num_correct"]} for p in per_prompt],
        "examples": examples,
    }


def markdown_table(result: dict[str, Any]) -> str:
    """Overall and per-metadata rows: prompts, avg@k, pass@1, pass@k, mean reward, mean length."""
    k = result["k"]
    cols = [f"avg@{k}"] + [f"pass@{j}" for j in ks_to_report(k)] + ["mean_reward", "mean_response_length"]
    lines = ["| subset | prompts | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]

    def row(name: str, m: dict[str, float]) -> str:
        return (
            f"| {name} | {int(m['num_prompts'])} | "
            + " | ".join(f"{m[c]:.3f}" if c != "mean_response_length" else f"{m[c]:.1f}" for c in cols)
            + " |"
        )

    lines.append(row("all", result["overall"]))
    for path, values in result["breakdown"].items():
        lines.extend(row(f"{path}={value}", m) for value, m in values.items())
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: str | Path, name: str = "eval") -> dict[str, Path]:
    """Write <out_dir>/<name>.json and <out_dir>/<name>.md; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["markdown"].write_text(f"# {name}\n\n" + markdown_table(result))
    return paths
