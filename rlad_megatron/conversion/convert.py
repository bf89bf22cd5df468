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
from rlad_megatron.conversion.arch import ModelArch, arch_from_config, load_config_dict
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
    stacked = len(rule.ckpt_stack(arch, layer)[0])  # one leading axis per stacked dimension (layer, expert)
    if part is not None:  # one half of linear_fc1: gate (0) or up (1), stored as its own chunk
        tensor = reader.get(names[part])
    else:
        tensor = tables.hf_to_megatron(rule, [reader.get(n) for n in names], arch, names)
    return tensor.reshape((1,) * stacked + tuple(tensor.shape))


def _chunks(arch: ModelArch, reader: HFReader, dtype: torch.dtype, rules) -> list[dist_ckpt.Chunk]:
    """The stored pieces of `rules`' tensors: one per key, except linear_fc1 (gate rows and up rows apart)."""
    out = []
    for rule, layer in rules:
        shape = tables.megatron_shape(rule, arch)
        at, stack = rule.ckpt_stack(arch, layer)
        make = functools.partial(_produce, reader, rule, layer, arch)
        pieces: list[tuple[tuple[int, ...], tuple[int, ...], int | None]]  # (offsets, sizes, fc1 half)
        if layer is not None and rule.transform == "gate_up":
            pieces = [((part * shape[0] // 2, 0), (shape[0] // 2, shape[1]), part) for part in (0, 1)]
        else:
            pieces = [((0,) * len(shape), shape, None)]
        out += [
            dist_ckpt.Chunk(
                key, (*stack, *shape), (*at, *offsets), (*(1,) * len(at), *sizes), dtype, functools.partial(make, part)
            )
            for key in rule.ckpt_keys
            for offsets, sizes, part in pieces
        ]
    return out


def extra_state_objects(arch: ModelArch, layer: int) -> dict[str, bytes]:
    """The (empty, local-spec) `_extra_state` Megatron stores per linear layer: one object per layer, and per
    (layer, expert) for the experts' linear layers (key suffix `shard_<offsets>_<global shape>`)."""
    L, E = arch.num_layers, arch.num_experts
    modules = EXTRA_STATE_MODULES[:2] if arch.is_moe else EXTRA_STATE_MODULES
    out = {f"decoder.layers.{m}._extra_state/shard_{layer}_{L}": dist_ckpt.serialized_none() for m in modules}
    for e in range(E):
        for m in ("linear_fc1", "linear_fc2"):
            key = f"decoder.layers.mlp.experts.experts.{m}._extra_state/shard_{layer}.{e}_{L}.{E}"
            out[key] = dist_ckpt.serialized_none()
    return out


def layer_groups(arch: ModelArch) -> list[list]:
    """(rule, layer) pairs grouped as streamed: the embedding, each layer, then the head."""
    groups = [tables.stage_rules(arch, [], last_stage=False)]
    groups += [[(r, i) for r in tables.layer_rules(arch)] for i in range(arch.num_layers)]
    groups.append(tables.stage_rules(arch, [], first_stage=False))
    return groups


def hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Convert a HF folder into a Megatron dist checkpoint loadable at any TP/PP; return out_dir."""
    config = load_config_dict(hf_dir)
    arch = arch_from_config(config)
    reader = HFReader(hf_dir)
    check_hf_shapes(arch, reader)
    dtype = dtype or arch.dtype
    groups = []
    for rules in layer_groups(arch):
        layer = rules[0][1]
        objects = {} if layer is None else extra_state_objects(arch, layer)
        groups.append((_chunks(arch, reader, dtype, rules), objects))
    out = Path(out_dir)
    dist_ckpt.write_checkpoint(out, groups)
    copy_hf_metadata(hf_dir, out / HF_CONFIG_SUBDIR, dtype)
    reader.close()
    return out


def _stored_key(rule: tables.Rule, reader: dist_ckpt.CheckpointReader) -> str:
    """The first of the rule's checkpoint spellings present in the checkpoint (or the first, to name it missing)."""
    return next((k for k in rule.ckpt_keys if reader.has(k)), rule.ckpt_key)


def _check_ckpt_shapes(arch: ModelArch, reader: dist_ckpt.CheckpointReader) -> None:
    for rule, layer in tables.iter_tensors(arch):
        if layer not in (None, 0) or rule.expert not in (None, 0):
            continue
        want = tables.megatron_shape(rule, arch)
        stack = rule.ckpt_stack(arch, layer)[1]
        key = _stored_key(rule, reader)
        got = reader.shape(key)
        if rule.transform == "vocab":
            ok = got[0] >= want[0] and got[1:] == want[1:]  # stored vocab may be padded
        else:
            ok = got == (*stack, *want)
        if not ok:
            axes = " x ".join(f"{n} {what}" for n, what in zip(stack, ("layers", "experts")))
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {got}, which does not match the HF config "
                f"({axes + ' x ' if axes else ''}{want})"
            )


def _requests(
    arch: ModelArch, rules, reader: dist_ckpt.CheckpointReader
) -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    out = {}
    for rule, layer in rules:
        shape = tables.megatron_shape(rule, arch)
        at = rule.ckpt_stack(arch, layer)[0]
        out[rule.megatron_name(layer)] = (
            _stored_key(rule, reader),
            (*at, *(0,) * len(shape)),
            (*(1,) * len(at), *shape),
        )
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
    _check_ckpt_shapes(arch, reader)
    dtype = dtype or reader.dtype("embedding.word_embeddings.weight")
    writer = HFShardWriter(out_dir, tables.hf_entries(arch, dtype, tables.iter_tensors(arch)), max_shard_bytes)
    for rule, layer in tables.iter_tensors(arch):  # one tensor in memory at a time
        name = rule.megatron_name(layer)
        full = reader.read(_requests(arch, [(rule, layer)], reader))[name]
        full = full.reshape(tables.megatron_shape(rule, arch))  # drop the stacked (layer, expert) axes
        for hf_name, tensor in zip(rule.hf_names(layer), tables.megatron_to_hf(rule, full, arch)):
            writer.add(hf_name, tensor.to(dtype))
    write_index(out_dir, writer.finish(), writer.total_bytes)
    copy_hf_metadata(hf_config_dir, out_dir, dtype)
    return Path(out_dir)
