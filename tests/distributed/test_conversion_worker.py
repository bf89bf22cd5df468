"""torchrun worker for test_conversion_megatron.py (no tests here; 1 or 2 gloo processes).

argv: <work_dir> <family> <tp> <pp>. The pytest side has already written a tiny HF model to
`<work_dir>/hf` and converted it with `rlad_megatron.conversion.convert.hf_to_megatron` to
`<work_dir>/mcore`. Here, each layout builds the Megatron student with the backend's
`build_model` and:
  1. loads the converted dist checkpoint (`load_model_checkpoint`) -> logits A,
  2. loads the HF folder directly into the shards (`load_hf_weights`) -> logits B,
  3. exports the live sharded model with `write_hf_folder` to `<work_dir>/export/step_1`,
  4. yields buckets with `export_hf_tensors` and records their names / bytes,
  5. saves the model with Megatron's own `dist_checkpointing.save` to `<work_dir>/saved` (the
     pytest side converts that back to HF: Megatron -> HF from a TP/PP-sharded save).
Full-vocabulary logits (gathered over TP, padding dropped) and measurements go to
`<work_dir>/result_tp<tp>_pp<pp>.pt` on rank 0; the pytest side compares them with transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

IDS = [[5, 17, 42, 9, 77, 3, 61, 28, 14, 90, 33, 7], [64, 2, 8, 99, 41, 12, 56, 70, 21, 6, 38, 11]]


def _logits(model, tp_group, pp_group, vocab: int):
    """Full logits [b, s, vocab] on every rank (PP: sent from the last stage)."""
    from megatron.core import parallel_state as mpu

    tokens = torch.tensor(IDS)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    if mpu.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            local = model(tokens, positions, None)  # [b, s, Vp/tp]
    else:
        local = _pipeline_forward(model, tokens, positions)
    shards = [torch.empty_like(local) for _ in range(dist.get_world_size(tp_group))]
    dist.all_gather(shards, local.contiguous(), group=tp_group)
    return torch.cat(shards, dim=-1)[..., :vocab]


def _pipeline_forward(model, tokens, positions):
    """Two-stage forward by hand: stage 0 sends hidden states [s, b, h] to stage 1."""
    from megatron.core import parallel_state as mpu

    with torch.no_grad():
        if mpu.is_pipeline_first_stage():
            hidden = model(tokens, positions, None).contiguous()
            dist.send(hidden, dst=mpu.get_pipeline_model_parallel_next_rank())
            out = torch.empty(tokens.shape[0], tokens.shape[1], model.padded_vocab_size)
            dist.recv(out, src=mpu.get_pipeline_model_parallel_next_rank())
            return out
        hidden = torch.empty(tokens.shape[1], tokens.shape[0], model.config.hidden_size)
        dist.recv(hidden, src=mpu.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
        out = model(tokens, positions, None).contiguous()
        dist.send(out, dst=mpu.get_pipeline_model_parallel_prev_rank())
        return out


def main() -> None:
    from rlad_megatron.backends.megatron.checkpoint_convert import (
        load_hf_weights,
        load_model_checkpoint,
    )
    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.backends.megatron.parallel import destroy_parallel, init_parallel
    from rlad_megatron.backends.megatron.weight_export import (
        export_hf_tensors,
        write_hf_folder,
    )
    from rlad_megatron.config import ModelConfig, ParallelConfig

    work, tp, pp = Path(sys.argv[1]), int(sys.argv[3]), int(sys.argv[4])
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    ctx = init_parallel(parallel, seed=1234)
    model_cfg = ModelConfig(transformer_impl="local", make_vocab_size_divisible_by=128)
    chunks = build_model(work / "hf", model_cfg, parallel)
    vocab = chunks[0].vocab_size_unpadded
    load_model_checkpoint(chunks, work / "mcore")
    logits_ckpt = _logits(chunks[0], ctx.tp_group, ctx.pp_group, vocab)

    chunks = build_model(work / "hf", model_cfg, parallel)  # fresh random weights
    load_hf_weights(chunks, work / "hf", tp_group=ctx.tp_group)
    logits_hf = _logits(chunks[0], ctx.tp_group, ctx.pp_group, vocab)
    folder = write_hf_folder(
        chunks,
        work / "export",
        step=1,
        hf_config_dir=work / "hf",
        tp_group=ctx.tp_group,
        pp_group=ctx.pp_group,
        dp_rank=ctx.dp_rank,
    )
    buckets = list(export_hf_tensors(chunks, tp_group=ctx.tp_group, bucket_bytes=64 << 10))
    first_only = [(n, t) for b in export_hf_tensors(chunks, tp_group=ctx.tp_group, to_first=True) for n, t in b]
    firsts = [None] * ctx.world_size
    dist.all_gather_object(firsts, [n for n, _ in first_only])
    whole = [
        kv
        for b in export_hf_tensors(chunks, tp_group=ctx.tp_group, pp_group=ctx.pp_group, bucket_bytes=32 << 10)
        for kv in b
    ]  # every stage's tensors, on global rank 0 only
    wholes = [None] * ctx.world_size
    dist.all_gather_object(wholes, len(whole))
    from megatron.core import dist_checkpointing

    if ctx.rank == 0:
        (work / "saved").mkdir()
    dist.barrier()
    dist_checkpointing.save(chunks[0].sharded_state_dict(), str(work / "saved"))
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, [[(n, tuple(t.shape)) for n, t in b] for b in buckets])
    if ctx.rank == 0:
        torch.save(
            {
                "logits_ckpt": logits_ckpt,
                "logits_hf": logits_hf,
                "folder": str(folder),
                "firsts": firsts,
                "whole": dict(whole),
                "whole_order": [n for n, _ in whole],
                "whole_counts": wholes,
                "buckets": gathered,
                "bucket_sizes": [sum(t.numel() * t.element_size() for _, t in b) for b in buckets],
            },
            work / f"result_tp{tp}_pp{pp}.pt",
        )
    destroy_parallel(ctx)


if __name__ == "__main__":
    main()
