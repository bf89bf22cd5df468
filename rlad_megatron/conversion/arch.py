"""Architecture detection: a Hugging Face `config.json` -> `ModelArch`, the few facts conversion needs.

The config is read as plain JSON (no transformers import), so the converter works on a machine
without the model's transformers class and fails early, naming the field, on anything the name
tables do not cover: another architecture, MoE outside the Qwen3-MoE family (or Qwen3-MoE with dense
layers mixed in), sliding-window attention, a RoPE variant that `rope.py` does not compute exactly,
non-SiLU activations, MLP biases, or an o_proj bias. `check_supported` is also what the trainer's
model build, the embedded engine and `rlad train --dry-run` call, so every path refuses the same
configs with the same message (table of fields: docs/conversion.md, "Config fields that change the
maths").

Qwen3-MoE (`Qwen3MoeForCausalLM`): every layer is a sparse MoE block of `num_experts` SwiGLU experts
of width `moe_intermediate_size`, a bias-free router `mlp.gate`, top-`num_experts_per_tok` routing
with optional renormalisation (`norm_topk_prob`), and no shared experts.

Left out: multimodal wrappers (`*ForConditionalGeneration`), MTP heads, Mamba/hybrid layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlad_megatron.conversion.rope import UnsupportedRopeError, check_rope, rope_parameters

# architecture class -> family; model_type is the fallback when `architectures` is absent.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")
MOE_FAMILIES = ("qwen3_moe",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config fields that announce a mixture-of-experts model.
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedModelError(ValueError):
    """The config describes a model the conversion tables do not cover."""


@dataclass(frozen=True)
class ModelArch:
    """What conversion needs to know about a decoder-only HF model.

    `num_query_groups` is HF's `num_key_value_heads`; `heads_per_group = num_attention_heads //
    num_query_groups` is the GQA ratio.
    """

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    dtype: torch.dtype = torch.float32
    num_experts: int = 0  # 0: dense MLP; else routed experts per layer (Qwen3-MoE)
    moe_ffn_hidden_size: int = 0  # width of one expert's SwiGLU MLP
    moe_topk: int = 0  # experts per token
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a HF folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; pass a Hugging Face model folder holding config.json")
    return json.loads(p.read_text())


def detect_family(config: dict[str, Any]) -> str:
    """'llama' | 'qwen2' | 'qwen3' | 'qwen3_moe' from `architectures`, else `model_type`; raise naming the unknown one."""
    archs = config.get("architectures") or []
    for name in archs:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if archs:
        raise UnsupportedModelError(
            f"unsupported architecture {archs}; supported: {sorted(ARCHITECTURES)} "
            "(add a name table in rlad_megatron/conversion/tables.py for a new family)"
        )
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    raise UnsupportedModelError(
        f"unsupported model_type {model_type!r} (no `architectures` in config.json); supported: {list(FAMILIES)}"
    )


def check_supported(config: dict[str, Any], family: str) -> None:
    """Raise `UnsupportedModelError` naming the first config field the tables cannot convert."""

    def bad(field: str, value: Any, fix: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"config field {field}={value!r} is not supported for {family}: {fix}")

    if family in MOE_FAMILIES:
        _check_moe(config, bad)
    else:
        for name in _MOE_FIELDS:
            if config.get(name):
                raise bad(name, config[name], "mixture-of-experts models have no name table here")
    if config.get("use_sliding_window"):
        raise bad("use_sliding_window", True, "sliding-window attention is not implemented; set it to false")
    windowed = sorted({t for t in config.get("layer_types") or () if t != "full_attention"})
    if windowed:
        raise bad("layer_types", windowed, "only full attention in every layer is implemented")
    if config.get("hidden_act", "silu") != "silu":
        raise bad("hidden_act", config["hidden_act"], "only SwiGLU (silu) MLPs are supported")
    if config.get("mlp_bias"):
        raise bad("mlp_bias", True, "Megatron's SwiGLU MLP here has no biases")
    if family != "qwen2" and config.get("attention_bias"):
        raise bad("attention_bias", True, "the o_proj bias has no Megatron counterpart (add_bias_linear=False)")
    try:
        check_rope(rope_parameters(config))
    except UnsupportedRopeError as err:
        raise UnsupportedModelError(f"{family}: {err}") from None
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    if heads % groups:
        raise bad("num_key_value_heads", groups, f"must divide num_attention_heads={heads}")


def num_experts(config: dict[str, Any]) -> int:
    """Routed experts per layer (`num_experts`, which transformers 5 writes as `num_local_experts`)."""
    return int(config.get("num_experts") or config.get("num_local_experts") or 0)


def _check_moe(config: dict[str, Any], bad) -> None:
    if num_experts(config) < 1:
        raise bad("num_experts", num_experts(config), "a Qwen3-MoE config needs num_experts >= 1")
    if config.get("decoder_sparse_step", 1) != 1:
        raise bad("decoder_sparse_step", config["decoder_sparse_step"], "only all-MoE layers are supported; use 1")
    if config.get("mlp_only_layers"):
        raise bad("mlp_only_layers", config["mlp_only_layers"], "dense layers inside an MoE model are not supported")
    topk = config.get("num_experts_per_tok", 0)
    if not 1 <= topk <= num_experts(config):
        raise bad("num_experts_per_tok", topk, f"must be between 1 and num_experts={num_experts(config)}")


def config_dtype(config: dict[str, Any]) -> torch.dtype:
    """The checkpoint dtype named in config.json (`dtype` in transformers 5, `torch_dtype` before)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in DTYPES:
        raise UnsupportedModelError(f"config field dtype={name!r} is not supported; use one of {list(DTYPES)}")
    return DTYPES[name]


def arch_from_config(config: dict[str, Any] | str | Path) -> ModelArch:
    """`ModelArch` of a HF config (dict, folder or config.json path); raises on unsupported models."""
    if not isinstance(config, dict):
        config = load_config_dict(config)
    family = detect_family(config)
    check_supported(config, family)
    heads = config["num_attention_heads"]
    moe = family in MOE_FAMILIES
    return ModelArch(
        family=family,
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        dtype=config_dtype(config),
        num_experts=num_experts(config) if moe else 0,
        moe_ffn_hidden_size=config["moe_intermediate_size"] if moe else 0,
        moe_topk=config["num_experts_per_tok"] if moe else 0,
        norm_topk_prob=bool(config.get("norm_topk_prob", False)) if moe else False,
    )


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16'/'bfloat16'/'fp16'/'float16'/'fp32'/'float32' or a torch dtype -> torch dtype (None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use bf16, fp16 or fp32")
    return DTYPES[key]
