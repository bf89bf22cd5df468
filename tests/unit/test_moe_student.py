"""Qwen3-MoE students on one process: config detection, the routing mapping, and HF <-> Megatron weights.

The multi-process claims (EP=2 logits, loss and gradients, per-EP-rank export) are in
tests/distributed/test_moe_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlad_megatron.backends.megatron.model import transformer_config_from_hf
from rlad_megatron.backends.megatron.parallel import check_layout
from rlad_megatron.config import ModelConfig, ParallelConfig
from rlad_megatron.conversion import convert, tables
from rlad_megatron.conversion.arch import UnsupportedModelError, arch_from_config
from rlad_megatron.tiny_models import save_tiny_model, tiny_hf_config

IDS = [[5, 17, 42, 9, 77, 3, 61, 28, 14, 90, 33, 7], [64, 2, 8, 99, 41, 12, 56, 70, 21, 6, 38, 11]]


def test_qwen3_moe_arch_and_table_rows():
    arch = arch_from_config(tiny_hf_config("qwen3_moe").to_dict())
    assert (arch.family, arch.num_experts, arch.moe_ffn_hidden_size, arch.moe_topk, arch.norm_topk_prob) == (
        "qwen3_moe",
        4,
        32,
        2,
        True,
    )
    rule, layer = tables.rule_for_megatron_name(arch, "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight")
    assert (rule.expert, rule.tp) == (3, "gate_up")
    assert rule.hf_names(layer) == [
        "model.layers.1.mlp.experts.3.gate_proj.weight",
        "model.layers.1.mlp.experts.3.up_proj.weight",
    ]
    assert tables.megatron_shape(rule, arch) == (64, 64)
    rule, _ = tables.rule_for_megatron_name(arch, "decoder.layers.0.mlp.router.weight")
    assert (rule.hf, tables.megatron_shape(rule, arch)) == (("model.layers.{i}.mlp.gate.weight",), (4, 64))
    assert not any("mlp.gate_proj" in n for n in tables.expected_hf_names(arch))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"mlp_only_layers": [1]}, "mlp_only_layers"),
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok=5"),
    ],
)
def test_unsupported_moe_configs_name_the_field(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        arch_from_config(tiny_hf_config("qwen3_moe", **change).to_dict())


def test_offline_dist_checkpoint_of_moe_round_trips_bit_exact(tmp_path):
    """HF -> dist checkpoint -> HF without Megatron in between (its loader: tests/distributed/test_moe_dist_ckpt.py)."""
    from safetensors.torch import load_file

    hf = save_tiny_model(tmp_path / "hf", "qwen3_moe", tokenizer=False)
    convert.hf_to_megatron(hf, tmp_path / "mcore")
    back = convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "back")
    state = lambda folder: {k: v for f in Path(folder).glob("*.safetensors") for k, v in load_file(str(f)).items()}  # noqa: E731
    original, restored = state(hf), state(back)
    assert any(".mlp.experts.3." in k for k in original) and restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def _config(hf_config, ep=1, tp=1):
    return transformer_config_from_hf(
        hf_config,
        ModelConfig(transformer_impl="local"),
        ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep),
    )


def test_routing_fields_follow_the_hf_config():
    renorm = _config(tiny_hf_config("qwen3_moe"))
    assert (renorm.num_moe_experts, renorm.moe_router_topk, renorm.moe_ffn_hidden_size) == (4, 2, 32)
    assert not renorm.moe_router_pre_softmax and renorm.moe_aux_loss_coeff == 0.0
    assert renorm.moe_token_dispatcher_type == "allgather" and not renorm.moe_grouped_gemm
    plain = _config(tiny_hf_config("qwen3_moe", norm_topk_prob=False, output_router_logits=True))
    assert plain.moe_router_pre_softmax
    assert plain.moe_aux_loss_coeff == pytest.approx(0.001) and plain.moe_router_load_balancing_type == "aux_loss"


def test_impossible_moe_layouts_raise():
    with pytest.raises(ValueError, match="expert_model_parallel_size=3 must divide the number of experts"):
        _config(tiny_hf_config("qwen3_moe"), ep=3)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        _config(tiny_hf_config("qwen3_moe", num_experts_per_tok=1))
    with pytest.raises(ValueError, match="needs an MoE student"):
        _config(tiny_hf_config("qwen3"), ep=2)
    with pytest.raises(ValueError, match="tensor_model_parallel_size=2 needs parallel.sequence_parallel=true"):
        _config(tiny_hf_config("qwen3_moe"), tp=2)
    with_sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    assert transformer_config_from_hf(tiny_hf_config("qwen3_moe"), ModelConfig(transformer_impl="local"), with_sp)
    with pytest.raises(ValueError, match="expert_model_parallel_size"):
        ParallelConfig(expert_model_parallel_size=0)
    with pytest.raises(ValueError, match="must divide the data-parallel size 2"):
        check_layout(ParallelConfig(tensor_model_parallel_size=2, expert_model_parallel_size=4), 4)


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_hf_megatron_hf_bit_exact_and_logits_match_transformers(tmp_path, norm_topk_prob):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlad_megatron.backends.megatron.checkpoint_convert import load_hf_weights
    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.backends.megatron.parallel import destroy_parallel, init_parallel
    from rlad_megatron.backends.megatron.weight_export import export_hf_tensors

    hf = save_tiny_model(tmp_path / "hf", "qwen3_moe", seed=3, tokenizer=False, norm_topk_prob=norm_topk_prob)
    parallel = ParallelConfig()
    ctx = init_parallel(parallel, seed=1)
    try:
        chunks = build_model(hf, ModelConfig(transformer_impl="local"), parallel)
        load_hf_weights(chunks, hf)
        tokens = torch.tensor(IDS)
        with torch.no_grad():
            logits = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :128]
        exported = {name: t for bucket in export_hf_tensors(chunks) for name, t in bucket}
    finally:
        destroy_parallel(ctx)
    reference = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    original = load_file(str(hf / "model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
