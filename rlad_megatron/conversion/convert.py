"""Offline conversion, streaming tensor by tensor: HF folder <-> Megatron `torch_dist` checkpoint.

`hf_to_megatron` validates every HF name and shape against the config (from safetensors headers,
no data read), then writes the dist checkpoint through `dist_ckpt.write_checkpoint`, whose chunks
each read only the HF tensors they need. `megatron_to_hf` reads one tensor at a time from the
checkpoint and streams the HF tensors into planned safetensors shards. Peak memory is one layer
(writing) or about three copies of the largest tensor (reading: DCP's byte buffer, torch.load,
the destination), independent of depth.

The HF config and tokenizer travel with the dist checkpoint in `<ckpt>/hf_config/`, so the
reverse direction needs no extra argument.

Left out: optimizer state, checkpoints saved by other frameworks' layouts (e.g. Megatron-LM's
legacy `mp_rank_XX/model_optim_rng.pt`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from rlad_megatron.conversion import dist_ckpt, tables
from rlad_megatron.conversion.arch import ModelArch, UnsupportedModelError, arch_from_config, load_config_dict
from rlad_megatron.conversion.hf_io import (
    HFReader,
    HFShardWriter,
    copy_hf_metadata,
    write_index,
)

HF_CONFIG_SUBDIR = "hf_config"
# Linear layers whose (empty, local-spec) `_extra_state` Megatron stores per layer.
EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def check_hf_shapes(arch: ModelArch, reader: HFReader) -> None:
    """Raise naming the first HF tensor whose stored shape differs from what config.json implies."""
    tables.check_hf_names(arch, reader.names())
    for rule, layer in tables.iter_tensors(arch):
        for name, shape in zip(rule.hf_names(layer), tables.expected_hf_shapes(rule, arch)):
            if reader.shape(name) != shape:
                raise ValueError(
                    f"tensor {name!r} has shape {reader.shape(name)} in the checkpoint, "
                    f"expected {shape} from config.json"
                )


def _produce(reader: HFReader, rule: tables.Rule, layer, arch: ModelArch, part: int | None) -> torch.Tensor:
    names = rule.hf_names(layer)
    if part is not None:  # one half of linear_fc1: gate (0) or up (1), stored as its own chunk
        return reader.get(names[part]).unsqueeze(0)
    full = tables.hf_to_megatron(rule, [reader.get(n) for n in names], arch, names)
    return full if layer is None else full.unsqueeze(0)


def _chunks(arch: ModelArch, reader: HFReader, dtype: torch.dtype, rules) -> list[dist_ckpt.Chunk]:
    L = arch.num_layers
    out = []
    for rule, layer in rules:
        shape = tables.megatron_shape(rule, arch)
        make = functools.partial(_produce, reader, rule, layer, arch)
        if layer is None:
            out.append(
                dist_ckpt.Chunk(rule.ckpt_key, shape, (0,) * len(shape), shape, dtype, functools.partial(make, None))
            )
        elif rule.transform == "gate_up":
            half = (shape[0] // 2, shape[1])
            out += [
                dist_ckpt.Chunk(
                    rule.ckpt_key,
                    (L, *shape),
                    (layer, part * half[0], 0),
                    (1, *half),
                    dtype,
                    functools.partial(make, part),
                )
                for part in (0, 1)
            ]
        else:
            out.append(
                dist_ckpt.Chunk(
                    rule.ckpt_key,
                    (L, *shape),
                    (layer,) + (0,) * len(shape),
                    (1, *shape),
                    dtype,
                    functools.partial(make, None),
                )
            )
    return out


def layer_groups(arch: ModelArch) -> list[list]:
    """(rule, layer) pairs grouped as streamed: the embedding, each layer, then the head."""
    groups = [tables.stage_rules(arch, [], last_stage=False)]
    groups += [[(r, i) for r in tables.layer_rules(arch)] for i in range(arch.num_layers)]
    groups.append(tables.stage_rules(arch, [], first_stage=False))
    return groups


def _refuse_moe(arch: ModelArch) -> None:
    if arch.is_moe:
        raise UnsupportedModelError(
            f"offline dist-checkpoint conversion of the MoE family {arch.family} is not implemented (Megatron stores "
            "experts under an extra expert axis); train from the HF folder (model.student loads it directly) and "
            "export with `rlad train`'s HF export or weight_export.write_hf_folder"
        )


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a HF folder into a Megatron dist checkpoint loadable at any TP/PP; return out_dir."""
    config = load_config_dict(hf_dir)
    arch = arch_from_config(config)
    _refuse_moe(arch)
    reader = HFReader(hf_dir)
    check_hf_shapes(arch, reader)
    dtype = dtype or arch.dtype
    L = arch.num_layers
    groups = []
    for rules in layer_groups(arch):
        layer = rules[0][1]
        objects = (
            {}
            if layer is None
            else {
                f"decoder.layers.{m}._extra_state/shard_{layer}_{L}": dist_ckpt.serialized_none()
                for m in EXTRA_STATE_MODULES
            }
        )
        groups.append((_chunks(arch, reader, dtype, rules), objects))
    out = Path(out_dir)
    dist_ckpt.write_checkpoint(out, groups)
    copy_hf_metadata(hf_dir, out / HF_CONFIG_SUBDIR, dtype)
    reader.close()
    return out


def _check_ckpt_shapes(arch: ModelArch, reader: dist_ckpt.CheckpointReader) -> None:
    L = arch.num_layers
    for rule, layer in tables.iter_tensors(arch):
        if layer not in (None, 0):
            continue
        want = tables.megatron_shape(rule, arch)
        got = reader.shape(rule.ckpt_key)
        if rule.transform == "vocab":
            ok = got[0] >= want[0] and got[1:] == want[1:]  # stored vocab may be padded
        else:
            ok = got == (want if layer is None else (L, *want))
        if not ok:
            raise ValueError(
                f"checkpoint tensor {rule.ckpt_key!r} has shape {got}, which does not match "
                f"the HF config ({'' if layer is None else f'{L} layers x '}{want})"
            )


def _requests(arch: ModelArch, rules) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    out = {}
    for rule, layer in rules:
        shape = tables.megatron_shape(rule, arch)
        if layer is None:
            out[rule.megatron_name()] = (rule.ckpt_key, (0,) * len(shape), shape)
        else:
            out[rule.megatron_name(layer)] = (rule.ckpt_key, (layer,) + (0,) * len(shape), (1, *shape))
    return out


def megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    hf_config_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30,
    key_prefix: str | None = None,
) -> Path:
    """Convert a Megatron dist checkpoint (saved at any TP/PP) into a sharded HF safetensors folder."""
    reader = dist_ckpt.CheckpointReader(ckpt_dir, key_prefix)
    if hf_config_dir is None:
        hf_config_dir = Path(ckpt_dir) / HF_CONFIG_SUBDIR
        if not hf_config_dir.exists():
            raise FileNotFoundError(
                f"{ckpt_dir} carries no {HF_CONFIG_SUBDIR}/; pass the student's HF folder "
                "as hf_config_dir (CLI: --hf-config) for config.json and tokenizer files"
            )
    arch = arch_from_config(load_config_dict(hf_config_dir))
    _refuse_moe(arch)
    _check_ckpt_shapes(arch, reader)
    dtype = dtype or reader.dtype("embedding.word_embeddings.weight")
    writer = HFShardWriter(out_dir, tables.hf_entries(arch, dtype, tables.iter_tensors(arch)), max_shard_bytes)
    for rule, layer in tables.iter_tensors(arch):  # one tensor in memory at a time
        name = rule.megatron_name(layer)
        full = reader.read(_requests(arch, [(rule, layer)]))[name]
        full = full if layer is None else full[0]
        for hf_name, tensor in zip(rule.hf_names(layer), tables.megatron_to_hf(rule, full, arch)):
            writer.add(hf_name, tensor.to(dtype))
    write_index(out_dir, writer.finish(), writer.total_bytes)
    copy_hf_metadata(hf_config_dir, out_dir, dtype)
    return Path(out_dir)
