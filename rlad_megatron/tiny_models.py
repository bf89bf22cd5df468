"""Tiny random Hugging Face models for tests, benchmarks and the CPU demo (no hub access).

`tiny_hf_config(family)` covers the three supported families with the features each one
exercises: Llama (GQA, untied), Qwen2 (QKV bias), Qwen3 (QK-norm, tied embeddings), Qwen3-MoE
(4 experts of width 32, top-2, renormalised top-k probabilities, untied).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")


def tiny_hf_config(family: str = "llama", **overrides: Any):
    from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    cls: type[PretrainedConfig]
    base: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    if family == "llama":
        cls = LlamaConfig
    elif family == "qwen2":
        cls = Qwen2Config
    elif family == "qwen3":
        cls = Qwen3Config
        base.update(head_dim=16, tie_word_embeddings=True)
    elif family == "qwen3_moe":
        cls = Qwen3MoeConfig
        base.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {list(FAMILIES)}")
    base.update(overrides)
    return cls(**base)


def save_tiny_model(
    out_dir: str | Path, family: str = "llama", seed: int = 0, tokenizer: bool = True, **overrides: Any
):
    """Write a random-init HF model (safetensors) and, optionally, the char tokenizer; return the folder."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from rlad_megatron.data.tokenizer import build_char_tokenizer

    out = Path(out_dir)
    if tokenizer:
        tok = build_char_tokenizer(out)
        overrides.setdefault("vocab_size", len(tok))
        overrides.setdefault("pad_token_id", tok.pad_token_id)
        overrides.setdefault("eos_token_id", tok.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family, **overrides), dtype=torch.float32)
    hf_logging.disable_progress_bar()  # a progress bar per tiny model only clutters test and demo logs
    model.save_pretrained(str(out))
    return out
