"""HF config -> Megatron TransformerConfig mapping, layout errors, vocab padding, log-prob maths (1 process)."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.backends.megatron.logprobs import (
    logprobs_and_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_topk_logprobs,
)
from rlad_megatron.backends.megatron.model import (
    padded_vocab_size,
    transformer_config_from_hf,
)
from rlad_megatron.config import ModelConfig, ParallelConfig
from rlad_megatron.tiny_models import tiny_hf_config


def _cfg(family, tp=1, pp=1, **over):
    return transformer_config_from_hf(
        tiny_hf_config(family, **over),
        ModelConfig(),
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
    )


@pytest.mark.parametrize(
    ("family", "qkv_bias", "qk_norm", "kv_channels"),
    [("llama", False, False, 16), ("qwen2", True, False, 16), ("qwen3", False, True, 16)],
)
def test_family_features_are_mapped(family, qkv_bias, qk_norm, kv_channels):
    cfg = _cfg(family)
    assert (cfg.add_qkv_bias, cfg.qk_layernorm, cfg.kv_channels) == (qkv_bias, qk_norm, kv_channels)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.normalization) == (4, 2, "RMSNorm")
    assert cfg.gated_linear_unit and not cfg.add_bias_linear and cfg.calculate_per_token_loss


def test_qwen3_explicit_head_dim_differs_from_hidden_over_heads():
    cfg = _cfg("qwen3", head_dim=32)
    assert cfg.kv_channels == 32 and cfg.hidden_size // cfg.num_attention_heads == 16


def test_megatron_passthrough_overrides_fields():
    model_cfg = ModelConfig(megatron={"recompute_granularity": "selective", "init_method_std": 0.01})
    cfg = transformer_config_from_hf(tiny_hf_config("llama"), model_cfg, ParallelConfig())
    assert cfg.recompute_granularity == "selective" and cfg.init_method_std == 0.01


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"tp": 3}, "must divide the attention heads"), ({"tp": 4}, "KV heads"), ({"pp": 3}, "number of layers")],
)
def test_impossible_layouts_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _cfg("llama", **kwargs)


def test_unsupported_architecture_raises():
    cfg = tiny_hf_config("llama")
    cfg.model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        transformer_config_from_hf(cfg, ModelConfig(), ParallelConfig())


def test_padded_vocab_is_tp_independent_with_default_multiple():
    assert padded_vocab_size(125, 128, 1) == padded_vocab_size(125, 128, 2) == 128
    assert padded_vocab_size(151_936, 128, 8) == 151_936
    assert padded_vocab_size(10, 1, 4) == 12


def test_single_rank_logprobs_entropy_topk_match_log_softmax_with_padding_and_temperature():
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 16, generator=gen) * 4).requires_grad_(True)
    targets = torch.randint(0, 13, (2, 5), generator=gen)
    ref = torch.log_softmax(logits[..., :13].detach() / 0.6, dim=-1)
    lp, ent = logprobs_and_entropy(logits, targets, None, temperature=0.6, vocab_size=13)
    assert torch.allclose(lp, ref.gather(-1, targets.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent, -(ref.exp() * ref).sum(-1), atol=1e-5)
    topk = vocab_parallel_topk_logprobs(
        logits, targets.unsqueeze(-1).repeat(1, 1, 3), None, temperature=0.6, vocab_size=13
    )
    assert torch.allclose(topk[..., 2], lp, atol=1e-6)
    lp.sum().backward()
    assert logits.grad[..., 13:].abs().max() == 0  # padded columns get no gradient
    assert vocab_parallel_logprobs(logits.detach(), targets, None).shape == (2, 5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(logits, targets, None, temperature=0.0)
