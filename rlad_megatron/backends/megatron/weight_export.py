"""Live weight export: sharded Megatron model chunks -> full Hugging Face tensors, bucket by bucket.

Every TP/PP rank holds a shard. For each parameter of its stage, in the name table's order, the
TP group all-gathers the shard (contiguous tensors: gloo sends wrong data for strided ones), the
table's transform turns the full Megatron tensor into HF tensors (QKV split per query group,
gate/up split, vocabulary unpadded), and the result joins a bucket of about `bucket_bytes`.
Only one parameter is ever materialised in full, never the model.

Two sinks:
- `export_hf_tensors(...)` yields `list[(hf_name, tensor)]` buckets, for an in-process engine or
  an NCCL broadcast to SGLang servers (`rlad_megatron.engines.sglang_fleet`); with `pp_group`
  the later stages send their buckets to pipeline rank 0, one bucket at a time.
- `write_hf_folder(...)` writes `<root>/step_N.tmp/` without any gather: the file layout is known
  from the config, so every TP rank copies its own slices into the pre-sized safetensors shards
  (`conversion.parallel_write`); then rank 0 renames it to `<root>/step_N/` and moves the
  `<root>/latest` pointer. That folder is what SGLang's `/update_weights_from_disk` reads.

Pipeline parallelism: each stage exports its own layers under their global indices (taken from
each layer's `layer_number`); in `write_hf_folder` every stage writes its own shard files and
rank 0 merges the index. Data-parallel replicas other than `dp_rank == 0` skip the work.

MoE experts under expert parallelism: each EP rank holds `num_experts / EP` experts, numbered
locally by Megatron; `global_named_params` renames them to their global index and `stage_plan`
keeps the expert rows this rank holds, so every EP rank exports (and loads) its own experts. The
bucket sink therefore yields only this EP rank's experts (the embedded engine needs EP=1, or the
buckets of every EP rank); `write_hf_folder` writes every rank's experts into one folder.

Left out: virtual pipeline stages, gathering experts over EP ranks into one bucket stream.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlad_megatron.conversion import tables
from rlad_megatron.conversion.arch import ModelArch, arch_from_config
from rlad_megatron.conversion.hf_io import (
    copy_hf_metadata,
    prune_steps,
    publish_step_folder,
    write_index,
)
from rlad_megatron.conversion.parallel_write import (
    create_files,
    local_pieces,
    plan_layout,
    write_piece,
)
from rlad_megatron.conversion.transforms import tp_merge

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^(mlp\.experts\.local_experts\.)(\d+)(\..+)$")
# With tied embeddings, stages without the embedding keep a copy in output_layer.weight.
TIED_OUTPUT_RULE = tables.Rule("output_layer.weight", ("model.embed_tokens.weight",), "vocab", "column")
NamedTensors = list[tuple[str, torch.Tensor]]


def unwrap(chunk: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers (typed Any: its Megatron attributes are untyped)."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_arch(chunk: torch.nn.Module) -> ModelArch:
    """`ModelArch` of a chunk built by `model.build_model` (which keeps the HF config on it)."""
    hf_config = getattr(unwrap(chunk), "hf_config", None)
    if hf_config is None:
        raise ValueError("model chunk has no .hf_config; pass arch= explicitly (conversion.arch_from_config)")
    return arch_from_config(hf_config.to_dict())


def global_named_params(chunk: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters keyed by name with the *global* layer index (pipeline stages number layers from 0)."""
    model = unwrap(chunk)
    out = {}
    for name, param in model.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = model.decoder.layers[int(match.group(1))]
            suffix = match.group(2)
            expert = _LOCAL_EXPERT.match(suffix)
            if expert:  # SequentialMLP numbers this EP rank's experts from 0
                first = layer.mlp.local_expert_indices[0]
                suffix = f"{expert.group(1)}{first + int(expert.group(2))}{expert.group(3)}"
            name = f"decoder.layers.{layer.layer_number - 1}.{suffix}"
        out[name] = param
    return out


def stage_plan(chunk: torch.nn.Module, arch: ModelArch, tied_copy: bool = False, experts_only: bool = False):
    """[(rule, layer, param)] of this stage in table order; raise naming missing / unknown params.

    `tied_copy` adds the tied output-layer copy held by a non-first last stage (loading needs it,
    exporting does not). `experts_only` keeps only the MoE expert rows this rank holds.
    """
    params = global_named_params(chunk)
    layers = sorted({int(m.group(1)) for n in params if (m := _LAYER.match(n))})
    first = "embedding.word_embeddings.weight" in params
    last = "decoder.final_layernorm.weight" in params
    plan = []
    held_experts = {int(m.group(2)) for n in params if (m := _LOCAL_EXPERT.match(n.split(".", 3)[-1]))}
    for rule, layer in tables.stage_rules(arch, layers, first, last):
        if rule.expert is not None and rule.expert not in held_experts:
            continue  # held by another expert-parallel rank
        param = params.pop(rule.megatron_name(layer), None)
        if param is None and rule.ckpt_alias:  # Transformer Engine spelling of a fused norm
            param = params.pop(rule.ckpt_alias.format(i=layer), None)
        if param is None:
            raise KeyError(
                f"model has no parameter {rule.megatron_name(layer)!r} required by the "
                f"{arch.family} table (is the layer spec / config the one the model was built with?)"
            )
        plan.append((rule, layer, param))
    tied = params.pop("output_layer.weight", None) if arch.tie_word_embeddings else None
    if tied is not None and tied_copy:
        plan.append((TIED_OUTPUT_RULE, None, tied))
    if params:
        raise KeyError(f"model parameters {sorted(params)[:8]} have no rule in the {arch.family} table")
    return [p for p in plan if p[0].expert is not None] if experts_only else plan


def group_size_rank(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_tp(param: torch.Tensor, kind: str, tp_group, to_first: bool = False) -> torch.Tensor | None:
    """Full (TP=1 layout) tensor from this rank's shard: all_gather over `tp_group`, then merge.

    `to_first`: gather onto TP rank 0 only (half the traffic when one rank consumes the result);
    the other ranks get None.
    """
    tp, tp_rank = group_size_rank(tp_group)
    if tp == 1 or kind == "replicated":
        return param.detach() if tp_rank == 0 or not to_first else None
    shard = param.detach().contiguous()  # gloo sends wrong data for non-contiguous tensors
    if to_first:
        first = dist.get_global_rank(tp_group, 0)
        if tp_rank != 0:
            dist.gather(shard, None, dst=first, group=tp_group)
            return None
        gathered = [torch.empty_like(shard) for _ in range(tp)]
        dist.gather(shard, gathered, dst=first, group=tp_group)
        return tp_merge(gathered, kind)
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard, group=tp_group)
    return tp_merge(shards, kind)


def _hf_tensors(plan, arch: ModelArch, tp_group, dtype, copy: bool, to_first: bool):
    for rule, layer, param in plan:
        full = gather_tp(param, rule.tp, tp_group, to_first)
        if full is None:
            continue
        for name, tensor in zip(rule.hf_names(layer), tables.megatron_to_hf(rule, full, arch)):
            out = tensor.to(dtype or tensor.dtype)
            if copy and out.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
                out = out.clone()  # never hand out a view of a live trainer parameter
            yield name, out


def _stage_buckets(
    model_chunks, arch, tp_group, bucket_bytes: int, dtype, copy: bool, to_first: bool
) -> Iterator[NamedTensors]:
    bucket: NamedTensors = []
    size = 0
    for chunk in model_chunks:
        chunk_arch = arch or model_arch(chunk)
        plan = stage_plan(chunk, chunk_arch)
        for name, tensor in _hf_tensors(plan, chunk_arch, tp_group, dtype, copy, to_first):
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, tensor.contiguous()))
            size += nbytes
    if bucket:
        yield bucket


def _gather_pipeline(buckets: Iterator[NamedTensors], pp_group, device: torch.device) -> Iterator[NamedTensors]:
    """Pipeline rank 0 yields its own buckets, then every later stage's, received one bucket at a time.

    Later stages send each bucket's (name, shape, dtype) list with `send_object_list`, then its
    tensors with `send`, then a None marker; they yield nothing.
    """
    pp, pp_rank = group_size_rank(pp_group)
    first = dist.get_global_rank(pp_group, 0)
    if pp_rank != 0:
        for bucket in buckets:
            dist.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in bucket]], dst=first, group=pp_group)
            for _, tensor in bucket:
                dist.send(tensor, dst=first, group=pp_group)
        dist.send_object_list([None], dst=first, group=pp_group)
        return
    yield from buckets
    for stage in range(1, pp):
        src = dist.get_global_rank(pp_group, stage)
        while True:
            meta: list = [None]
            dist.recv_object_list(meta, src=src, group=pp_group)
            if meta[0] is None:
                break
            # Received on the parameters' device: an NCCL pipeline group cannot receive into CPU memory.
            bucket = [(name, torch.empty(shape, dtype=dt, device=device)) for name, shape, dt in meta[0]]
            for _, tensor in bucket:
                dist.recv(tensor, src=src, group=pp_group)
            yield bucket


def export_hf_tensors(
    model_chunks: list[torch.nn.Module],
    arch: ModelArch | None = None,
    *,
    tp_group=None,
    pp_group=None,
    bucket_bytes: int = 512 << 20,
    dtype: torch.dtype | None = None,
    copy: bool = True,
    to_first: bool = False,
) -> Iterator[NamedTensors]:
    """Yield buckets of (HF name, full tensor) for this pipeline stage's parameters.

    Collective over `tp_group`: every TP rank of the stage must consume the iterator (each gets
    the same buckets; with `to_first` only TP rank 0 gets them, the others yield nothing).
    With `pp_group` (implies `to_first`), every rank of the TP x PP grid must consume it and the
    whole model arrives, bucket by bucket in table order, on the rank with TP rank 0 and pipeline
    rank 0 only. Tensors are `dtype` (default: the parameter's), contiguous, and (with `copy`)
    never alias trainer parameters. A bucket holds at most `bucket_bytes` unless a single tensor
    is larger.
    """
    whole_model = pp_group is not None
    local = _stage_buckets(model_chunks, arch, tp_group, bucket_bytes, dtype, copy, to_first or whole_model)
    if not whole_model:
        yield from local
    elif group_size_rank(tp_group)[1] != 0:
        for _ in local:  # take part in this stage's TP gathers; TP rank 0 holds the results
            pass
    elif group_size_rank(pp_group)[0] == 1:
        yield from local
    else:
        device = next(unwrap(model_chunks[0]).parameters()).device
        yield from _gather_pipeline(local, pp_group, device)


def _entries(model_chunks, arch, dtype, experts_only: bool):
    out = []
    for chunk in model_chunks:
        chunk_arch = arch or model_arch(chunk)
        for rule, layer, param in stage_plan(chunk, chunk_arch, experts_only=experts_only):
            out += tables.hf_entries(chunk_arch, dtype or param.dtype, [(rule, layer)])
    return out


def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _export_stage(
    model_chunks, tmp: Path, arch, tp_group, pp_group, dtype, max_shard_bytes: int, ep_rank: int = 0
) -> tuple[dict[str, str], int, torch.dtype | None]:
    """This stage's shards in `tmp`, every TP rank writing its own slices: (weight_map, bytes, dtype).

    No gather: TP rank 0 lays out the files (headers, sizes), then each rank copies the parts of
    the HF tensors its shards hold into them (`conversion.parallel_write`). `ep_rank > 0`: only
    this expert-parallel rank's experts, into files of their own (EP rank 0 writes the rest).
    """
    (tp, tp_rank), (pp_size, pp_rank) = group_size_rank(tp_group), group_size_rank(pp_group)
    arch = arch or model_arch(model_chunks[0])  # reading the HF config object is slow: once
    experts_only = ep_rank > 0
    entries = _entries(model_chunks, arch, dtype, experts_only)
    prefix = "model" if pp_size == 1 else f"model-pp{pp_rank}"
    files, slots = plan_layout(entries, max_shard_bytes, f"{prefix}-ep{ep_rank}" if experts_only else prefix)
    if tp_rank == 0:
        create_files(tmp, files)
    _barrier(tp_group)
    for chunk in model_chunks:
        for rule, layer, param in stage_plan(chunk, arch, experts_only=experts_only):
            for piece in local_pieces(rule, layer, param.detach(), arch, tp, tp_rank):
                write_piece(tmp, slots[piece.name], piece)
    _barrier(tp_group)  # every slice is in place before the folder is published
    if tp_rank != 0 or not entries:
        return {}, 0, None
    total = sum(math.prod(shape) * d.itemsize for _, shape, d in entries)
    return {name: slot.file for name, slot in slots.items()}, total, entries[0][2]


def write_hf_folder(
    model_chunks: list[torch.nn.Module],
    out_root: str | Path,
    step: int,
    *,
    hf_config_dir: str | Path,
    arch: ModelArch | None = None,
    tp_group=None,
    pp_group=None,
    dp_rank: int = 0,
    ep_rank: int = 0,
    expert_dp_rank: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30,
    keep_last: int = 0,
) -> Path:
    """Collective over the whole world: export the live model to `<out_root>/step_<step>/` atomically.

    Data-parallel rank 0 writes every tensor it holds; under expert parallelism the ranks with
    `expert_dp_rank == 0` and `ep_rank > 0` add the experts they hold. `hf_config_dir` supplies
    config.json and tokenizer files (the student's HF folder). Older
    `step_*` folders beyond `keep_last` are deleted (default 0 keeps all). Returns the published folder
    (`<out_root>/latest` names it) on every rank.
    """
    root = Path(out_root)
    tmp, final = root / f"step_{step}.tmp", root / f"step_{step}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if dp_rank == 0:
        result = _export_stage(model_chunks, tmp, arch, tp_group, pp_group, dtype, max_shard_bytes)
    elif ep_rank > 0 and expert_dp_rank == 0:
        result = _export_stage(model_chunks, tmp, arch, tp_group, pp_group, dtype, max_shard_bytes, ep_rank)
    else:
        result = ({}, 0, None)
    results: list[Any] = [result]
    if dist.is_initialized():
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
    if rank == 0:
        weight_map = {k: v for wm, _, _ in results for k, v in wm.items()}
        write_index(tmp, weight_map, sum(total for _, total, _ in results))
        # config.json names the dtype actually written, so from_pretrained loads it as is.
        copy_hf_metadata(hf_config_dir, tmp, next(d for _, _, d in results if d is not None))
        publish_step_folder(tmp, final)
        prune_steps(root, keep_last)
    _barrier()
    return final
