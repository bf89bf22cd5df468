"""torchrun worker for test_context_parallel.py (no tests here; run with 4 gloo processes).

Reference: the TP=1, CP=1 trainer (DP=4) and the plain single-process forward/backward of the full
batch on its unwrapped model (`test_megatron_worker.reference_loss_and_grads`). Each context-parallel
layout then loads the reference weights through the trainer's checkpoint and runs one forward/backward
of the same samples; the differences of loss, every parameter gradient and the forward-only log-probs
go to a JSON file that the pytest side asserts on.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import test_megatron_worker as base  # noqa: E402
import torch.distributed as dist

LAYOUTS = {
    # name: (tensor parallel, sequence parallel, logprob_chunk_size); CP=2 in all, DP = 4 / (TP x CP)
    "cp2_dp2": (1, False, 1024),
    "cp2_dp2_unchunked": (1, False, 0),
    "cp2_tp2": (2, False, 3),
    "cp2_tp2_sp": (2, True, 1024),
}


def make_cfg(tp: int, sp: bool, chunk: int):
    cfg = base.make_cfg(tp=tp, sp=sp)
    cfg.parallel.context_parallel_size = 2
    cfg.model.logprob_chunk_size = chunk
    return cfg


def main(out_path: str) -> None:
    from rlad_megatron.backends.megatron import checkpoint
    from rlad_megatron.backends.megatron.parallel import init_parallel

    holder = [tempfile.mkdtemp(prefix="cp_ckpt_") if int(os.environ["RANK"]) == 0 else None]
    init_parallel(base.make_cfg().parallel, 0)
    dist.broadcast_object_list(holder, src=0)
    run_dir = holder[0]
    samples, results = base.make_samples(), {}
    adv = base.inputs(samples)
    reference = base.make_trainer(base.make_cfg())
    old = base.old_logprobs_for(reference, samples)
    checkpoint.save_checkpoint(reference, run_dir, 0, {})
    ref_loss, ref_grads, ref_lp = base.reference_loss_and_grads(reference, samples, adv, old)
    results["ref_grad_max"] = max(g.abs().max().item() for g in ref_grads.values())
    results["sequence_lengths"] = sorted(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    for name, layout in LAYOUTS.items():
        trainer = base.make_trainer(make_cfg(*layout))
        checkpoint.load_checkpoint(trainer, checkpoint.checkpoint_root(run_dir) / "step_0")
        lp = trainer.compute_logprobs(samples)
        metrics = trainer.forward_backward(samples, adv, 0, old_logprobs=old)
        results[name] = {
            "cp_size": trainer.parallel.context_parallel_size,
            "lp": base.lp_diff(lp, ref_lp),
            "loss": abs(metrics["loss"] - ref_loss),
            "grad": base.max_diff(base.full_tensors(trainer, True), ref_grads),
        }
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
