"""Conversion entry points that touch a live Megatron model.

- `load_hf_weights(model_chunks, hf_dir, tp_group=...)`: initialise the sharded student straight
  from a HF folder. Each rank reads (lazily, tensor by tensor) only what its stage needs, applies
  the name table's transform, pads the vocabulary to the model's padded size and keeps its own
  TP shard. No dist checkpoint is needed to start training from HF weights.
- `load_model_checkpoint(model_chunks, ckpt_dir)`: load a model-only dist checkpoint (such as
  `rlad convert hf-to-megatron` writes) with Megatron's own `dist_checkpointing.load`, at any TP/PP.

The offline converters themselves (`rlad_megatron.conversion.convert`) need no Megatron import.
Left out: optimizer state (see `checkpoint.py` for full trainer checkpoints).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlad_megatron.backends.megatron.weight_export import (
    group_size_rank,
    model_arch,
    stage_plan,
    unwrap,
)
from rlad_megatron.conversion import tables
from rlad_megatron.conversion.arch import arch_from_config
from rlad_megatron.conversion.convert import check_hf_shapes
from rlad_megatron.conversion.hf_io import HFReader
from rlad_megatron.conversion.transforms import pad_vocab, tp_split


def _check_same_arch(chunk, arch) -> None:
    if getattr(unwrap(chunk), "hf_config", None) is None:
        return
    built = model_arch(chunk)
    fields = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "vocab_size", "qk_norm")
    diff = [f for f in fields if getattr(built, f) != getattr(arch, f)]
    if diff:
        raise ValueError(
            f"the HF checkpoint's config differs from the model's in {diff}; build the model from the same config.json"
        )


@torch.no_grad()
def load_hf_weights(model_chunks: list[torch.nn.Module], hf_dir: str | Path, *, tp_group=None) -> None:
    """Copy a HF checkpoint into this rank's shards of `model_chunks` (collective-free)."""
    arch = arch_from_config(hf_dir)
    reader = HFReader(hf_dir)
    check_hf_shapes(arch, reader)
    tp, tp_rank = group_size_rank(tp_group)
    for chunk in model_chunks:
        _check_same_arch(chunk, arch)
        for rule, layer, param in stage_plan(chunk, arch, tied_copy=True):
            names = rule.hf_names(layer)
            full = tables.hf_to_megatron(rule, [reader.get(n) for n in names], arch, names)
            if rule.transform == "vocab":
                full = pad_vocab(full, param.shape[0] * tp)
            shard = tp_split(full, rule.tp, tp)[tp_rank]
            if shard.shape != param.shape:
                raise ValueError(
                    f"{rule.megatron_name(layer)}: shard from HF has shape {tuple(shard.shape)}, "
                    f"the model parameter {tuple(param.shape)}"
                )
            param.copy_(shard)
    reader.close()


def load_model_checkpoint(model_chunks: list[torch.nn.Module], ckpt_dir: str | Path, strict: bool = True) -> None:
    """Collective: load model weights from a dist checkpoint (any TP/PP it was saved with)."""
    from megatron.core import dist_checkpointing

    if len(model_chunks) != 1:
        raise ValueError("virtual pipeline stages (several model chunks) are not supported here")
    model = unwrap(model_chunks[0])
    state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    model.load_state_dict(state, strict=strict)
