"""torchrun worker for test_moe_dist_ckpt.py: `<work_dir> <tp> <ep>`, nproc = tp x ep.

Builds the tiny Qwen3-MoE student at TP=tp, EP=ep (DP = ep) with the backend's `build_model`, loads the dist checkpoint that
`conversion.convert.hf_to_megatron` wrote to `<work_dir>/mcore` with Megatron's own loader, computes the logits
of IDS, and saves the model with Megatron's own `dist_checkpointing.save` to `<work_dir>/saved_tp<tp>_ep<ep>`.
Rank 0 writes `<work_dir>/result_tp<tp>_ep<ep>.pt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

IDS = [[5, 17, 42, 9, 77, 3, 61, 28, 14, 90, 33, 7], [64, 2, 8, 99, 41, 12, 56, 70, 21, 6, 38, 11]]


def main() -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from rlad_megatron.backends.megatron.checkpoint_convert import load_model_checkpoint
    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.backends.megatron.parallel import destroy_parallel, init_parallel
    from rlad_megatron.config import ModelConfig, ParallelConfig

    work, tp, ep = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    parallel = ParallelConfig(tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=tp > 1)
    ctx = init_parallel(parallel, seed=1234)
    chunks = build_model(work / "hf", ModelConfig(transformer_impl="local", make_vocab_size_divisible_by=128), parallel)
    model = chunks[0]
    experts = sum(
        1
        for n, _ in model.named_parameters()
        if ".layers.0.mlp.experts.local_experts." in n and n.endswith("linear_fc2.weight")
    )
    load_model_checkpoint(chunks, work / "mcore")
    tokens = torch.tensor(IDS)
    with torch.no_grad():
        local = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)  # [b, s, padded vocab / tp]
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=ctx.tp_group)
    logits = torch.cat(shards, dim=-1)[..., : model.vocab_size_unpadded]
    saved = work / f"saved_tp{tp}_ep{ep}"
    if ctx.rank == 0:
        saved.mkdir()
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(saved))
    held = [None] * ctx.world_size
    dist.all_gather_object(held, experts)
    if ctx.rank == 0:
        torch.save({"logits": logits, "experts_per_rank": held}, work / f"result_tp{tp}_ep{ep}.pt")
    destroy_parallel(ctx)


if __name__ == "__main__":
    main()
