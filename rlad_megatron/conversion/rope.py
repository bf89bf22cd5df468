"""RoPE frequencies of a Hugging Face config, computed the way transformers computes them.

One implementation serves the Megatron student (it replaces the rotary embedding's `inv_freq`
and folds the attention factor into the softmax scale, `backends/megatron/model.py`) and the
embedded engine (`engines/model.py`), so both match transformers' `modeling_rope_utils` for
every supported `rope_type`:

| rope_type | parameters read | attention factor |
|---|---|---|
| `default` | `rope_theta` | 1 |
| `linear` | `factor` (frequencies divided by it) | 1 |
| `llama3` | `factor`, `low_freq_factor`, `high_freq_factor`, `original_max_position_embeddings` | 1 |
| `yarn` | `factor`, `original_max_position_embeddings`, `beta_fast` (32), `beta_slow` (1), `truncate` (true), `attention_factor` or `mscale` / `mscale_all_dim` | `attention_factor`, else 0.1 ln(factor) + 1 (or the mscale ratio) |

Refused by name (`UnsupportedRopeError`): `dynamic` (transformers rescales the frequencies with the
longest sequence seen so far, state no other engine reproduces), `longrope` and any other type,
`partial_rotary_factor` != 1, and per-layer-type RoPE dicts.

`rope_parameters(config)` reads a plain config.json dict in any of the layouts transformers
accepts: transformers 5 `rope_parameters`, 4.x `rope_scaling` + top-level `rope_theta`, and the old
`type` key; `original_max_position_embeddings` defaults to `max_position_embeddings` as in
transformers. Everything here is plain torch (no transformers import).
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_REFUSED_WHY = {
    "dynamic": "transformers rescales dynamic-NTK frequencies with the longest sequence it has seen so far, "
    "which the trainer and the engines cannot reproduce; use rope_type 'yarn' or 'linear', or drop the scaling",
}
_REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
}
DEFAULT_THETA = 10_000.0


class UnsupportedRopeError(ValueError):
    """The config's RoPE variant is not computed exactly here; the message names the field."""


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The flat RoPE dict transformers builds from this config.json (`rope_type`, `rope_theta`, ...)."""
    raw = config.get("rope_scaling") or config.get("rope_parameters") or {}
    layer_types = set(config.get("layer_types") or ())
    if layer_types and layer_types & set(raw):
        raise UnsupportedRopeError(
            f"config field rope_parameters has one entry per layer type ({sorted(layer_types & set(raw))}); "
            "only one RoPE for all layers is supported"
        )
    params = dict(raw)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta") or DEFAULT_THETA)
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def check_rope(params: dict[str, Any]) -> None:
    """Raise `UnsupportedRopeError` naming the field when `params` is not computed exactly here."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = _REFUSED_WHY.get(rope_type, "it has no implementation in the trainer and the engines")
        raise UnsupportedRopeError(
            f"config field rope_type={rope_type!r} is not supported: {why}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor")
    if partial is not None and float(partial) != 1.0:
        raise UnsupportedRopeError(
            f"config field partial_rotary_factor={partial!r} is not supported: rotary embeddings are applied to the "
            "whole head dimension only (partial_rotary_factor 1.0)"
        )
    missing = [key for key in _REQUIRED.get(rope_type, ()) if params.get(key) is None]
    if missing:
        raise UnsupportedRopeError(f"rope_type={rope_type!r} needs rope_parameters {missing} in config.json")
    if rope_type == "llama3" and float(params["high_freq_factor"]) <= float(params["low_freq_factor"]):
        raise UnsupportedRopeError(
            f"rope_type='llama3' needs high_freq_factor > low_freq_factor, got high_freq_factor="
            f"{params['high_freq_factor']!r}, low_freq_factor={params['low_freq_factor']!r}"
        )


def _base_frequencies(theta: float, head_dim: int) -> torch.Tensor:
    """theta ** (-2i / head_dim) for i < head_dim / 2, float32 (transformers' default)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Keep short wavelengths, divide long ones by `factor`, blend linearly in wavelength-inverse between."""
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    context = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_between = ~(wavelength < context / high) * ~(wavelength > context / low)
    return torch.where(in_between, blended, scaled)


def _yarn_attention_factor(params: dict[str, Any], factor: float) -> float:
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def log_scale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return float(log_scale(factor, mscale) / log_scale(factor, mscale_all_dim))
    return log_scale(factor)


def _yarn(params: dict[str, Any], head_dim: int, max_positions: int | None) -> tuple[torch.Tensor, float]:
    """NTK-by-parts: interpolate (divide by factor) the slow dimensions, extrapolate the fast ones, ramp between."""
    theta = params["rope_theta"]
    context = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        if max_positions is None:
            raise ValueError(
                "yarn RoPE without a factor needs max_position_embeddings in config.json (factor = it / "
                "original_max_position_embeddings): add one of them"
            )
        factor = max_positions / context
    attention_factor = _yarn_attention_factor(params, factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times over `context`
        return (head_dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dimension_of(beta_fast), dimension_of(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    periods = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolated, interpolated = 1.0 / periods, 1.0 / (factor * periods)
    keep = 1 - ramp  # 1: extrapolate (fast dims), 0: interpolate (slow dims)
    return interpolated * (1 - keep) + extrapolated * keep, attention_factor


def inv_freq_and_attention_factor(
    params: dict[str, Any], head_dim: int, max_positions: int | None
) -> tuple[torch.Tensor, float]:
    """float32 inverse frequencies [head_dim // 2] and the factor transformers multiplies cos/sin by."""
    check_rope(params)
    rope_type, theta = params["rope_type"], float(params["rope_theta"])
    if rope_type == "yarn":
        return _yarn(params, head_dim, max_positions)
    inv_freq = _base_frequencies(theta, head_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, params)
    return inv_freq, 1.0


def config_rope(config: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """`inv_freq_and_attention_factor` of a config.json dict (head_dim from the config as transformers reads it)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return inv_freq_and_attention_factor(rope_parameters(config), head_dim, config.get("max_position_embeddings"))
