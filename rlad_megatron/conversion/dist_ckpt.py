"""Megatron dist checkpoints (`torch_dist` format) written and read chunk by chunk, with torch DCP only.

Megatron-Core's `dist_checkpointing` stores a model as a PyTorch Distributed Checkpoint: one
global tensor per key, where transformer-layer tensors are stacked along a leading layer axis
(`decoder.layers.mlp.linear_fc2.weight` has shape `[num_layers, H, F]`), `linear_fc1` is stored
as two chunks (gate rows, then up rows), each linear layer has an `_extra_state` byte object per
layer (`<key>/shard_<i>_<num_layers>`), plus `metadata.json` (backend names) and `common.pt`
(non-sharded state, empty for a GPT model). Because the layout is global, one checkpoint loads
at any TP/PP with `dist_checkpointing.load(model.sharded_state_dict(), dir)`; the vocabulary rows
are stored unpadded and Megatron's embedding / output layer load them with `allow_shape_mismatch`.

Writing goes through DCP's own `FileSystemWriter`, one save per group of chunks (a layer), with a
planner whose `resolve_data` builds each chunk on demand; the groups' metadata is merged into one
`.metadata` (DCP's writer holds every tensor of a save until it ends, so one save of the whole
model would hold the whole model). Reading asks DCP for sub-chunks (one
layer of a stacked tensor). No process group is needed for either (`no_dist=True`).

Left out: optimizer state (use the trainer's own checkpoints), fp8 extra state contents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import (
    create_read_items_for_chunk_list,
)

CONFIG_FNAME = "metadata.json"
COMMON_FNAME = "common.pt"
MEGATRON_CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@contextlib.contextmanager
def _single_process():
    """Silence DCP's warning that no process group exists: single-process I/O is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


@dataclass
class Chunk:
    """One stored piece of a global tensor; `produce()` returns it, shaped `sizes`, when it is written."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


class _LazySavePlanner(DefaultSavePlanner):
    """Plans the given chunks and byte objects; tensors are built only when DCP writes them."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, bytes]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {MetadataIndex(c.key, c.offsets): c for c in chunks}
        self._objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [
            WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape),
                ),
            )
            for index, c in self._chunks.items()
        ]
        items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self._objects]
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        chunk = self._chunks[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
        tensor = chunk.produce()
        if tuple(tensor.shape) != tuple(chunk.sizes):
            raise ValueError(
                f"chunk of {chunk.key} at {chunk.offsets} has shape {tuple(tensor.shape)}, expected {chunk.sizes}"
            )
        return tensor.to(chunk.dtype).contiguous()


def _save_part(part_dir: Path, chunks: list[Chunk], objects: dict[str, bytes]):
    """One DCP save of a group of chunks (e.g. one layer) into its own folder; returns its metadata."""
    # thread_count=1: items are written in plan order, one resolved tensor at a time.
    writer = dcp.FileSystemWriter(str(part_dir), single_file_per_rank=True, thread_count=1)
    with _single_process():
        dcp.save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, objects), no_dist=True)
    return dcp.FileSystemReader(str(part_dir)).read_metadata()


def _merge_into(merged: Metadata, part: Metadata, rename: dict[str, str]) -> None:
    for key, md in part.state_dict_metadata.items():
        have = merged.state_dict_metadata.get(key)
        if have is None:
            merged.state_dict_metadata[key] = md
        elif isinstance(md, TensorStorageMetadata) and isinstance(have, TensorStorageMetadata) and have.size == md.size:
            have.chunks.extend(md.chunks)  # another layer's chunk of the same stacked tensor
        else:
            raise ValueError(f"checkpoint key {key!r} was written twice with different metadata")
    for index, info in part.storage_data.items():
        merged.storage_data[index] = dataclasses.replace(info, relative_path=rename[info.relative_path])


def write_checkpoint(out_dir: str | Path, groups: list[tuple[list[Chunk], dict[str, bytes]]]) -> None:
    """Write a Megatron `torch_dist` checkpoint from groups of lazily produced chunks and byte objects.

    DCP's file writer keeps every tensor of one save alive until the save ends, so each group
    (one layer) is saved on its own and the per-group metadata is merged into one `.metadata`:
    peak memory is one group, not the model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged = Metadata(state_dict_metadata={}, storage_data={})
    for g, (chunks, objects) in enumerate(groups):
        part_dir = out / f".part{g}"
        shutil.rmtree(part_dir, ignore_errors=True)
        part = _save_part(part_dir, chunks, objects)
        rename = {}
        for file in part_dir.glob("*.distcp"):
            rename[file.name] = f"__part{g}{file.name}"
            os.replace(file, out / rename[file.name])
        _merge_into(merged, part, rename)
        shutil.rmtree(part_dir)
    merged.version = part.version if groups else None
    with open(out / ".metadata.tmp", "wb") as handle:
        pickle.dump(merged, handle)
    os.replace(out / ".metadata.tmp", out / ".metadata")
    torch.save({}, out / COMMON_FNAME)
    (out / CONFIG_FNAME).write_text(json.dumps(MEGATRON_CONFIG))


def serialized_none() -> bytes:
    """The bytes Megatron stores for an `_extra_state` of None (local-spec linear layers).

    Megatron saves a ShardedObject as `torch.save([obj.data for each local replica])`: one None.
    """
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads requested sub-chunks of stored tensors into caller-provided destination tensors."""

    def __init__(self, requests: dict[str, tuple[str, tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._requests = requests  # name -> (key, offsets, dest)

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, (key, offsets, dest) in self._requests.items():
            assert self.metadata is not None  # set by set_up_planner before planning
            md = self.metadata.state_dict_metadata[key]
            if not isinstance(md, TensorStorageMetadata):
                raise ValueError(f"checkpoint key {key!r} holds a non-tensor object, not the tensor {name!r}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(key, md, [chunk]):
                # Route the read to this request's destination (several requests may share a key).
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(name, offsets)))
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        dest = self._requests[read_item.dest_index.fqn][2]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        return None  # resolve_tensor returned a view of the destination: already in place


class CheckpointReader:
    """Random access to the tensors of a `torch_dist` checkpoint folder.

    `key_prefix` is prepended to model keys (e.g. when the model state sits under a prefix);
    `None` detects it from where `embedding.word_embeddings.weight` is stored.
    """

    def __init__(self, ckpt_dir: str | Path, key_prefix: str | None = None) -> None:
        self.dir = Path(ckpt_dir)
        config = self.dir / CONFIG_FNAME
        if not config.exists():
            raise FileNotFoundError(f"{config} not found: {self.dir} is not a Megatron dist checkpoint")
        backend = json.loads(config.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise ValueError(f"{self.dir} uses sharded_backend={backend!r}; only 'torch_dist' is supported")
        self.metadata = dcp.FileSystemReader(str(self.dir)).read_metadata()
        self.tensors = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self.prefix = self._detect_prefix() if key_prefix is None else key_prefix

    def _detect_prefix(self) -> str:
        anchor = "embedding.word_embeddings.weight"
        if anchor in self.tensors:
            return ""
        # Optimizer state keys also end with the parameter name; the model's own key has no "optimizer".
        found = [k[: -len(anchor)] for k in self.tensors if k.endswith(anchor) and "optimizer" not in k]
        if len(found) != 1:
            raise KeyError(f"cannot find a unique {anchor!r} in {self.dir}; pass key_prefix explicitly")
        return found[0]

    def has(self, key: str) -> bool:
        return self.prefix + key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        full = self.prefix + key
        if full not in self.tensors:
            raise KeyError(f"tensor {full!r} is missing from the Megatron checkpoint {self.dir}")
        return tuple(self.tensors[full].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[self.prefix + key].properties.dtype

    def read(self, requests: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Read sub-chunks: name -> (key, offsets, sizes) gives name -> tensor of shape `sizes`."""
        plan = {}
        for name, (key, offsets, sizes) in requests.items():
            self.shape(key)
            plan[name] = (self.prefix + key, tuple(offsets), torch.empty(sizes, dtype=self.dtype(key)))
        with _single_process():
            dcp.load(
                {}, storage_reader=dcp.FileSystemReader(str(self.dir)), planner=_ChunkLoadPlanner(plan), no_dist=True
            )
        return {name: dest for name, (_, _, dest) in plan.items()}
