"""torchrun worker for test_token_columns_ranks.py (no tests here; run with 2 gloo processes, data parallel 2).

For each objective (OPD: teacher log-probs in the advantages; RLAD: in the loss; GKD: the top-k), rank 0 makes a
step's samples and both ranks get them twice: through `components.broadcast_samples` as the loop calls it
(`train.columns_needed` picks the samples), and pickled whole to every rank (`components.broadcast`, the way
samples travelled before). Each way then runs the loop's own step maths (`train.compute_advantages`,
`trainer.forward_backward` per minibatch, DP-reduced); losses, metrics, advantages and gradients are recorded. Rank 1
also records which samples it holds columns of, and whether those equal the whole samples' values.
"""

from __future__ import annotations

import functools
import json
import random
import sys
import types

import numpy as np
import torch
import torch.distributed as dist

VOCAB = 125
K = 4


def make_cfg(algorithm: str):
    from rlad_megatron.config import RunConfig

    cfg = RunConfig()
    cfg.algorithm.name, cfg.algorithm.group_size, cfg.algorithm.gkd_top_k = algorithm, 2, K
    cfg.train.micro_batch_tokens, cfg.train.lr, cfg.train.num_minibatches = 24, 1e-2, 2
    return cfg


def make_samples(n: int = 8, seed: int = 0):
    """Lists of Python ints and floats, as engines leave them; log-probs are float64 values that float32 rounds."""
    from rlad_megatron.types import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 6))]
        length = rng.randint(2, 9)
        out.append(
            Sample(
                prompt_ids=prompt,
                group_index=i // 2,
                response_ids=[rng.randrange(2, VOCAB) for _ in range(length)],
                rollout_logprobs=[-rng.random() * 3 for _ in range(length)],
                teacher_logprobs=[-rng.random() * 3 for _ in range(length)],
                teacher_topk_ids=np.array([rng.sample(range(VOCAB), K) for _ in range(length)], dtype=np.int32),
                teacher_topk_logprobs=np.array(
                    [[-rng.random() * 5 for _ in range(K)] for _ in range(length)], np.float32
                ),
                finish_reason="stop" if i % 3 else "length",
                reward=float(i % 3 == 0),
                record={"question": f"q{i // 2}"},
            )
        )
    return out


def grads(trainer) -> torch.Tensor:
    return torch.cat([p.main_grad.detach().flatten().clone() for p in trainer.unwrapped_model()[0].parameters()])


def step(run, samples) -> dict:
    """The loop's step maths on these samples, without the optimizer update (weights stay as they are)."""
    from rlad_megatron import train

    trainer = run.trainer
    old = trainer.compute_logprobs(samples, which="old") if run.objective.needs_old_logprobs else None
    advantages = train.compute_advantages(run, samples, old, step=1)
    reported, gradients = [], []
    for index in train.minibatches(samples, run.cfg.train.num_minibatches):
        metrics = trainer.forward_backward(
            [samples[i] for i in index], [advantages[i] for i in index], 1, old_logprobs=train._pick(old, index)
        )
        reported.append(metrics)  # the loss and the objective's metrics (e.g. RLAD's teacher log-ratio)
        gradients.append(grads(trainer))
    return {"advantages": advantages, "metrics": reported, "grads": gradients}


def share(samples, index, dp_rank):
    """The samples of `index` data-parallel rank `dp_rank` of 2 trains on (the trainer's split)."""
    from rlad_megatron.backends.megatron.batching import split_for_data_parallel

    return [index[j] for j in split_for_data_parallel([samples[i] for i in index], 2)[dp_rank]]


def as_trainer_reads(values, name: str) -> torch.Tensor:
    """A column as the trainer reads it: ids as int64, log-probs as float32."""
    return torch.as_tensor(np.asarray(values), dtype=torch.int64 if name.endswith("_ids") else torch.float32)


def received(light, whole) -> dict:
    """Per column, the samples whose values this rank holds; whether they equal the whole samples' values (in
    the column's dtype); which columns of the other samples stayed behind; whether every length is kept."""
    from rlad_megatron.types import TOKEN_COLUMNS, AbsentColumn

    held = {name: [i for i, s in enumerate(light) if s.holds(name)] for name in TOKEN_COLUMNS}
    exact = all(
        torch.equal(as_trainer_reads(getattr(light[i], name), name), as_trainer_reads(getattr(whole[i], name), name))
        for name in TOKEN_COLUMNS
        for i in held[name]
    )
    absent = sorted(
        {c.name for s in light for name in TOKEN_COLUMNS if isinstance(c := getattr(s, name), AbsentColumn)}
    )
    lengths_kept = all(
        len(getattr(a, name)) == len(getattr(b, name)) for a, b in zip(light, whole) for name in TOKEN_COLUMNS
    )
    return {"held": held, "exact": exact, "absent_names": absent, "lengths_kept": lengths_kept}


def main(out_path: str) -> None:
    from rlad_megatron import components, train
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.parallel import destroy_parallel
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.tiny_models import tiny_hf_config

    results: dict = {}
    for algorithm in ("opd", "rlad", "gkd"):
        cfg = make_cfg(algorithm)
        objective = build_objective(cfg.algorithm)
        torch.manual_seed(0)
        trainer = MegatronTrainer(cfg, objective, hf_config=tiny_hf_config("qwen3", vocab_size=VOCAB))
        rank = dist.get_rank()
        run = types.SimpleNamespace(cfg=cfg, objective=objective, trainer=trainer, active_trainer=trainer, rank=rank)
        samples = make_samples() if rank == 0 else None
        light = components.broadcast_samples(
            samples, rank, columns_wanted=functools.partial(train.columns_needed, run), device=trainer.parallel.device
        )
        whole = components.broadcast(samples, rank)
        by_columns, by_pickle = step(run, light), step(run, whole)
        dp_rank = trainer.parallel.dp_rank
        minibatches = train.minibatches(whole, cfg.train.num_minibatches)
        trained = sorted({i for index in minibatches for i in share(whole, index, dp_rank)})
        scored = share(whole, list(range(len(whole))), dp_rank) if objective.needs_old_logprobs else []
        mine = {
            **received(light, whole),
            "trained": trained,
            "scored": scored,
            "num_samples": len(whole),
            "metrics_equal": by_columns["metrics"] == by_pickle["metrics"],
            "grads_equal": all(torch.equal(a, b) for a, b in zip(by_columns["grads"], by_pickle["grads"])),
            "grads_nonzero": all(bool(g.abs().max() > 0) for g in by_pickle["grads"]),
            "held_advantages_equal": all(by_columns["advantages"][i] == by_pickle["advantages"][i] for i in trained),
            "unheld_advantages": sorted(
                {type(by_columns["advantages"][i]).__name__ for i in range(len(whole)) if i not in trained}
            ),
        }
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results[algorithm] = gathered
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    destroy_parallel(trainer.parallel)


if __name__ == "__main__":
    main(sys.argv[1])
