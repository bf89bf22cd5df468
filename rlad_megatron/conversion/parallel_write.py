"""Several TP ranks writing one HF safetensors folder at once, each its own slice, with no gather.

The file layout is known before any data exists (names, shapes and dtypes come from the config),
so TP rank 0 writes every shard's header and sizes the files, then each rank writes the part of
each HF tensor its Megatron shard holds straight into the file with `os.pwrite` (no gather, no
extra copy):

- `column` QKV shard (whole query groups) -> per group, a block of rows in q_proj, k_proj, v_proj;
- `gate_up` shard -> a block of rows in gate_proj and in up_proj;
- `column` vocab shard -> a block of embedding / lm_head rows (padding rows dropped);
- `row` shard (linear_proj, linear_fc2) -> a block of columns of o_proj / down_proj;
- `replicated` tensors -> written whole by TP rank 0.

Shape legend: ng = query groups, hpg = heads per group, d = head_dim, V = vocab, tp = TP size.
Left out: ranks on different machines need a shared filesystem on which concurrent writes to
disjoint byte ranges of one file are safe (local disks, Lustre, GPFS; NFS needs care).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rlad_megatron.conversion import tables
from rlad_megatron.conversion import transforms as T
from rlad_megatron.conversion.arch import ModelArch
from rlad_megatron.conversion.hf_io import plan_shards, safetensors_header


@dataclass(frozen=True)
class Piece:
    """Part of one HF tensor held by this rank: all of it (axis None), or rows / columns from `start`."""

    name: str
    tensor: torch.Tensor
    axis: int | None = None
    start: int = 0


@dataclass(frozen=True)
class Slot:
    """Where a HF tensor's bytes live: file, absolute offset, shape, dtype."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def plan_layout(entries, max_shard_bytes: int, prefix: str = "model"):
    """(files: name -> (header bytes, size), slots: tensor name -> Slot); identical on every rank."""
    shards = plan_shards(list(entries), max_shard_bytes)
    files, slots = {}, {}
    for k, shard in enumerate(shards):
        file = f"{prefix}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offsets, size = safetensors_header(shard)
        files[file] = (header, size)
        slots.update({name: Slot(file, offsets[name], shape, dtype) for name, shape, dtype in shard})
    return files, slots


def create_files(out_dir: Path, files) -> None:
    """Write each shard's header and size the file (TP rank 0, before any rank writes data)."""
    for file, (header, size) in files.items():
        with open(out_dir / file, "wb") as handle:
            handle.write(header)
            handle.truncate(size)


def local_pieces(rule: tables.Rule, layer, local: torch.Tensor, arch: ModelArch, tp: int, tp_rank: int) -> list[Piece]:
    """The HF pieces this rank's Megatron shard `local` holds (see the module docstring)."""
    names = rule.hf_names(layer)
    if tp == 1 or rule.tp == "replicated":
        return [Piece(n, t) for n, t in zip(names, tables.megatron_to_hf(rule, local, arch))] if tp_rank == 0 else []
    if rule.tp == "row":
        return [Piece(names[0], local, 1, tp_rank * local.shape[1])]
    if rule.tp == "gate_up":
        gate, up = T.split_gate_up(local)
        return [Piece(names[0], gate, 0, tp_rank * gate.shape[0]), Piece(names[1], up, 0, tp_rank * up.shape[0])]
    if rule.transform == "qkv":  # per query group: contiguous rows of the shard -> rows of q, k, v
        groups, hpg, d = arch.num_query_groups // tp, arch.heads_per_group, arch.head_dim
        grouped = local.reshape(groups, (hpg + 2) * d, *local.shape[1:])
        out = []
        for g in range(groups):
            first = tp_rank * groups + g
            out += [
                Piece(names[0], grouped[g, : hpg * d], 0, first * hpg * d),
                Piece(names[1], grouped[g, hpg * d : (hpg + 1) * d], 0, first * d),
                Piece(names[2], grouped[g, (hpg + 1) * d :], 0, first * d),
            ]
        return out
    if rule.transform == "vocab":
        start = tp_rank * local.shape[0]
        keep = max(0, min(arch.vocab_size - start, local.shape[0]))  # rows past the vocab are padding
        return [Piece(names[0], local[:keep], 0, start)] if keep else []
    raise ValueError(f"no sharded write for {rule.megatron} (tp kind {rule.tp}, transform {rule.transform})")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:  # pwrite may write less than asked
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def write_piece(out_dir: Path, slot: Slot, piece: Piece) -> None:
    """Copy a piece into its place in the (pre-sized) file with `os.pwrite`, without a copy.

    Whole tensors and row blocks are contiguous in the file: one write. A column block (a
    row-parallel shard) is strided there: one write per row.
    """
    data = piece.tensor.to(device="cpu", dtype=slot.dtype).contiguous()  # GPU shards: one device-to-host copy
    row_bytes = math.prod(slot.shape[1:]) * slot.dtype.itemsize
    src = data.reshape(-1).view(torch.uint8).numpy().data  # a memoryview: no copy
    fd = os.open(out_dir / slot.file, os.O_WRONLY)
    try:
        if piece.axis != 1:
            _pwrite_all(fd, src, slot.offset + (piece.start * row_bytes if piece.axis == 0 else 0))
            return
        rows, col = slot.shape[0], piece.start * slot.dtype.itemsize
        width = len(src) // rows
        for row in range(rows):
            _pwrite_all(fd, src[row * width : (row + 1) * width], slot.offset + row * row_bytes + col)
    finally:
        os.close(fd)
