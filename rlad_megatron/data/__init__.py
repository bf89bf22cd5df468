"""Prompt datasets: sources, validation, templating, resumable sampling; the char tokenizer.

Training loop entry points: `load_run_data(cfg, tokenizer)` -> (train, eval) `PromptDataset`s and
`PromptSampler(train, seed, shuffle)` whose `next_batch(n)` yields `{"prompt_ids", "record"}`.
"""

from __future__ import annotations

from typing import Any

from rlad_megatron.data.loader import (
    DatasetError,
    PromptDataset,
    encode_prompt,
    load_prompts,
)
from rlad_megatron.data.row_readers import BadRow
from rlad_megatron.data.sampler import PromptSampler


def load_run_data(cfg: Any, tokenizer: Any) -> tuple[PromptDataset, PromptDataset | None]:
    """Train prompts (task split 'train') and eval prompts (task split 'test'; None when data.eval is empty)."""
    if not cfg.data.train:
        raise DatasetError(
            "data.train is empty; give a .jsonl/.parquet file, a datasets folder, task:<name> or reasoning_gym:<task>"
        )
    train = load_prompts(cfg.data.train, cfg.data, tokenizer, split="train", seed=cfg.seed)
    evaluation = (
        load_prompts(cfg.data.eval, cfg.data, tokenizer, split="test", seed=cfg.seed) if cfg.data.eval else None
    )
    return train, evaluation


__all__ = ["BadRow", "DatasetError", "PromptDataset", "PromptSampler", "encode_prompt", "load_prompts", "load_run_data"]
