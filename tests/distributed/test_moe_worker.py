"""torchrun worker for test_moe_parallel.py (no tests here; 2 gloo processes).

argv: <work_dir>. The pytest side wrote a tiny random Qwen3-MoE HF model (4 experts, top-2) to
`<work_dir>/hf`. Both layouts load it with the trainer's HF loader:
  1. EP=1 (DP=2): logits on `IDS`, and the single-process reference loss and gradients (plain
     autograd on the full batch; no collective runs at EP=1 with TP=1);
  2. EP=2 (DP=2, two experts per rank): logits on `IDS`, the trainer's DP/EP-split
     `forward_backward` loss and gradients (experts gathered over EP by their global names), and a
     `write_hf_folder` export to `<work_dir>/export/step_1` (each EP rank writes its own experts).
  3. routing replay (`model.routing_replay`) at EP=1, EP=2 and TP=2 with sequence parallelism: samples
     carrying seeded random experts (not the router's own): forward-only log-probs and the
     `forward_backward` loss.
Rank 0 saves the results to `<work_dir>/result.pt`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from test_megatron_worker import inputs, make_cfg, make_samples, old_logprobs_for, reference_loss_and_grads  # noqa: E402

IDS = [[5, 17, 42, 9, 77, 3, 61, 28, 14, 90, 33, 7], [64, 2, 8, 99, 41, 12, 56, 70, 21, 6, 38, 11]]


def build(hf: Path, ep: int, routing_replay: bool = False, tp: int = 1):
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.checkpoint_convert import load_hf_weights
    from rlad_megatron.backends.megatron.parallel import init_parallel
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer

    cfg = make_cfg(tp=tp, sp=tp > 1)
    cfg.parallel.expert_model_parallel_size = ep
    cfg.model.routing_replay = routing_replay
    parallel = init_parallel(cfg.parallel, cfg.seed)
    return MegatronTrainer(
        cfg,
        build_objective(cfg.algorithm),
        hf_config=hf,
        parallel=parallel,
        weight_loader=lambda chunks, folder: load_hf_weights(chunks, folder, tp_group=parallel.tp_group),
    )


def logits(trainer) -> torch.Tensor:
    model = trainer.unwrapped_model()[0]
    tokens = torch.tensor(IDS)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : trainer.vocab_size]


def global_grads(trainer) -> dict[str, torch.Tensor]:
    """{global name: main_grad} of the whole model: non-expert grads from rank 0, experts from their EP rank."""
    from rlad_megatron.backends.megatron.weight_export import global_named_params

    params = global_named_params(trainer.unwrapped_model()[0])
    mine = {n: p.main_grad.detach().clone() for n, p in params.items() if trainer.parallel.rank == 0 or "experts" in n}
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def with_random_routes(samples, layers: int = 2, topk: int = 2, experts: int = 4):
    """Copies of the samples carrying seeded random experts (the same on every rank) for every fed token."""
    import dataclasses

    import numpy as np

    g = torch.Generator().manual_seed(5)
    out = []
    for s in samples:
        rows = len(s.prompt_ids) + len(s.response_ids) - 1
        routes = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(rows * layers)])
        out.append(dataclasses.replace(s, routed_experts=routes.view(rows, layers, topk).numpy().astype(np.int16)))
    return out


def replay_results(hf: Path, samples, adv, old, results: dict) -> None:
    routed = with_random_routes(samples)
    for ep in (1, 2):
        tr = build(hf, ep=ep, routing_replay=True)
        results[f"replay_logprobs_ep{ep}"] = tr.compute_logprobs(routed)
        results[f"replay_loss_ep{ep}"] = tr.forward_backward(routed, adv, 0, old_logprobs=old)["loss"]
    tr = build(hf, ep=1, routing_replay=True, tp=2)  # sequence parallel: each TP rank replays its slice of the row
    results["replay_logprobs_tp2sp"] = tr.compute_logprobs(routed)
    results["replay_loss_tp2sp"] = tr.forward_backward(routed, adv, 0, old_logprobs=old)["loss"]


def main() -> None:
    from rlad_megatron.backends.megatron.weight_export import write_hf_folder

    work = Path(sys.argv[1])
    hf = work / "hf"
    results: dict = {}
    samples = make_samples(n=8)
    adv = inputs(samples)

    single = build(hf, ep=1)
    results["natural_logprobs"] = single.compute_logprobs(samples)
    old = old_logprobs_for(single, samples)
    results["logits_ep1"] = logits(single)
    ref_loss, ref_grads, _ = reference_loss_and_grads(single, samples, adv, old)
    results["ref_loss"], results["ref_grads"] = ref_loss, ref_grads

    tr = build(hf, ep=2)
    c = tr.parallel
    results["local_experts"] = [n for n in tr.unwrapped_model()[0].state_dict() if "local_experts" in n]
    results["logits_ep2"] = logits(tr)
    metrics = tr.forward_backward(samples, adv, 0, old_logprobs=old)
    results["loss_ep2"], results["grads_ep2"] = metrics["loss"], global_grads(tr)
    results["folder"] = write_hf_folder(
        tr.unwrapped_model(),
        work / "export",
        1,
        hf_config_dir=hf,
        tp_group=c.tp_group,
        pp_group=c.pp_group,
        dp_rank=c.dp_rank,
        ep_rank=c.ep_rank,
        expert_dp_rank=c.expert_dp_rank,
    )
    all_experts = [None] * dist.get_world_size()
    dist.all_gather_object(all_experts, results["local_experts"])
    results["experts_per_rank"] = all_experts
    replay_results(hf, samples, adv, old, results)
    if dist.get_rank() == 0:
        torch.save(results, work / "result.pt")
    dist.barrier()


if __name__ == "__main__":
    main()
