"""Name tables and transforms on plain tensors: round trips, layouts checked against slow references, errors."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.conversion import tables
from rlad_megatron.conversion import transforms as T
from rlad_megatron.conversion.arch import (
    UnsupportedModelError,
    arch_from_config,
    parse_dtype,
)

ARCH_NAMES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config(family="llama", heads=4, kv_heads=2, tied=False, **extra):
    cfg = {
        "architectures": [ARCH_NAMES[family]],
        "model_type": family,
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": 37,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "dtype": "float32",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    if family == "qwen3":
        cfg["head_dim"] = 16
    cfg.update(extra)
    return cfg


def random_hf_state(arch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen)
        for name, shape, _ in tables.hf_entries(arch, torch.float32, tables.iter_tensors(arch))
    }


CASES = [  # (family, heads, kv_heads, tied): GQA ratios 1, 2 and 4; bias; QK-norm; tied embeddings
    ("llama", 4, 4, False),
    ("llama", 4, 2, True),
    ("llama", 4, 1, False),
    ("qwen2", 4, 2, False),
    ("qwen2", 4, 1, True),
    ("qwen3", 4, 4, True),
    ("qwen3", 8, 2, False),
]


@pytest.mark.parametrize("family,heads,kv_heads,tied", CASES)
def test_round_trip_bit_exact_through_every_tp(family, heads, kv_heads, tied):
    arch = arch_from_config(config(family, heads, kv_heads, tied))
    hf = random_hf_state(arch)
    back = {}
    for rule, layer in tables.iter_tensors(arch):
        names = rule.hf_names(layer)
        full = tables.hf_to_megatron(rule, [hf[n] for n in names], arch, names)
        assert tuple(full.shape) == tables.megatron_shape(rule, arch)
        for tp in (1, 2) if kv_heads % 2 == 0 or rule.transform != "qkv" else (1,):
            padded = T.pad_vocab(full, 40) if rule.transform == "vocab" else full
            merged = T.tp_merge(T.tp_split(padded, rule.tp, tp), rule.tp)
            assert torch.equal(merged, padded)
        padded = T.pad_vocab(full, 40) if rule.transform == "vocab" else full
        back.update(zip(names, tables.megatron_to_hf(rule, padded, arch)))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    assert ("lm_head.weight" in hf) == (not tied)
    assert any(".q_norm." in k for k in hf) == (family == "qwen3")
    assert any("q_proj.bias" in k for k in hf) == (family == "qwen2")


def test_qkv_layout_matches_megatron_grouping():
    """Rows of group g: its hpg query heads, then k head g, then v head g (slow reference)."""
    ng, hpg, d, hidden = 2, 3, 4, 5
    q, k, v = torch.randn(ng * hpg * d, hidden), torch.randn(ng * d, hidden), torch.randn(ng * d, hidden)
    rows = []
    for g in range(ng):
        rows += [q[(g * hpg + h) * d : (g * hpg + h + 1) * d] for h in range(hpg)]
        rows += [k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]]
    fused = T.fuse_qkv(q, k, v, ng)
    assert torch.equal(fused, torch.cat(rows))
    shards = T.tp_split(fused, "column", 2)  # each TP rank gets one whole group
    assert torch.equal(shards[1], torch.cat(rows[hpg + 2 :]))
    assert all(torch.equal(a, b) for a, b in zip(T.split_qkv(fused, ng, hpg, d), (q, k, v)))


def test_gate_up_shards_hold_both_halves():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    fused = T.fuse_gate_up(gate, up)
    shards = T.tp_split(fused, "gate_up", 2)
    assert torch.equal(shards[0], torch.cat([gate[:2], up[:2]]))
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
    assert all(s.is_contiguous() for s in T.tp_split(torch.randn(4, 6), "row", 2))


def test_vocab_padding_round_trip():
    emb = torch.randn(37, 8)
    padded = T.pad_vocab(emb, 64)
    assert padded.shape == (64, 8) and torch.count_nonzero(padded[37:]) == 0
    assert torch.equal(T.unpad_vocab(padded, 37), emb)
    with pytest.raises(ValueError, match="larger than the padded size"):
        T.pad_vocab(emb, 30)


def test_live_names_local_and_te_spellings():
    arch = arch_from_config(config("qwen3"))
    rule, layer = tables.rule_for_megatron_name(arch, "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight")
    assert (rule.hf_names(layer), rule.ckpt_key) == (
        ["model.layers.1.input_layernorm.weight"],
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight",
    )
    rule, _ = tables.rule_for_megatron_name(arch, "decoder.layers.0.pre_mlp_layernorm.weight")
    assert rule.hf == ("model.layers.{i}.post_attention_layernorm.weight",)
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.router.weight"):
        tables.rule_for_megatron_name(arch, "decoder.layers.0.mlp.router.weight")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture \\['GPT2LMHeadModel'\\]"),
        ({"architectures": None, "model_type": "mistral"}, "unsupported model_type 'mistral'"),
        ({"num_experts": 8}, "num_experts=8"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}}, "rope_type='dynamic'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"dtype": "float8_e4m3fn"}, "dtype='float8_e4m3fn'"),
    ],
)
def test_unsupported_configs_name_the_field(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        arch_from_config(config("llama", **change))


def test_missing_unexpected_and_misshaped_tensors_are_named():
    arch = arch_from_config(config("qwen2"))
    hf = random_hf_state(arch)
    names = set(hf) - {"model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(KeyError, match="model.layers.1.self_attn.k_proj.bias"):
        tables.check_hf_names(arch, names)
    with pytest.raises(KeyError, match="model.layers.2.mlp.up_proj.weight"):
        tables.check_hf_names(arch, set(hf) | {"model.layers.2.mlp.up_proj.weight"})
    tables.check_hf_names(arch, set(hf) | {"model.layers.0.self_attn.rotary_emb.inv_freq"})
    rule, _ = tables.rule_for_megatron_name(arch, "decoder.layers.0.mlp.linear_fc2.weight")
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj.weight.*expected \\(32, 48\\)"):
        tables.hf_to_megatron(rule, [torch.zeros(48, 32)], arch, rule.hf_names(0))


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("fp32") is torch.float32 and parse_dtype(None) is None
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        parse_dtype("int8")


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_write_of_tp_shards_rebuilds_every_hf_tensor(tmp_path, tp):
    """Each simulated TP rank writes only its slices; the files must hold the exact HF tensors."""
    from safetensors.torch import load_file

    from rlad_megatron.conversion.parallel_write import (
        create_files,
        local_pieces,
        plan_layout,
        write_piece,
    )

    arch = arch_from_config(config("qwen2", heads=8, kv_heads=4, tied=False))
    hf = random_hf_state(arch)
    entries = tables.hf_entries(arch, torch.bfloat16, tables.iter_tensors(arch))
    files, slots = plan_layout(entries, max_shard_bytes=6000)
    create_files(tmp_path, files)
    for rule, layer in tables.iter_tensors(arch):
        names = rule.hf_names(layer)
        full = tables.hf_to_megatron(rule, [hf[n] for n in names], arch, names)
        full = T.pad_vocab(full, 48) if rule.transform == "vocab" else full  # 48 rows: 11 padding rows
        for rank, shard in enumerate(T.tp_split(full, rule.tp, tp)):
            for piece in local_pieces(rule, layer, shard, arch, tp, rank):
                write_piece(tmp_path, slots[piece.name], piece)
    written = {}
    for file in files:
        written.update(load_file(str(tmp_path / file)))
    assert len(files) > 2 and written.keys() == hf.keys()
    assert all(torch.equal(written[k], hf[k].to(torch.bfloat16)) for k in hf)
