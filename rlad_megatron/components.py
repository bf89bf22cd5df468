"""How the training loop builds and talks to the other packages (one function per seam).

train.py reads like pseudocode because every call into data/, rewards/, engines/, teacher/,
eval/, conversion/ and backends/megatron/ goes through a function here: build the trainer,
the engines, the data and the reward; score with the teacher; broadcast samples to the
trainer ranks; push weights to the rollout engine; evaluate; save and load checkpoints.
Left out: engines on ranks other than 0 (they receive samples by broadcast instead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rlad_megatron.sample_sources import Source, SourceContext
from rlad_megatron.types import Sample

if TYPE_CHECKING:
    from rlad_megatron.algorithms.objectives import Objective
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.config import RunConfig
    from rlad_megatron.train import Run


# ----------------------------------------------------------------------------- processes
def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast(value: Any, this_rank: int) -> Any:
    """Rank 0's value (samples, checkpoint extra state) on every rank; a no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value if this_rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_samples(samples: list[Sample] | None, this_rank: int, topk_wanted=None, device=None) -> list[Sample]:
    """Rank 0's samples on every rank.

    Without top-k columns: one `broadcast_object_list`. With them (GKD: k ids and k log-probs per response
    token, most of a step's bytes), the samples travel pickled without those columns, then each rank gets
    the top-k rows of only the samples `topk_wanted(samples)` names (the ones its data-parallel rank trains
    on) as two flat tensors, int32 ids and float32 log-probs [sum of their response lengths, k], sent by rank
    0 point to point; each sample's rows are a view into them (offsets from the response lengths every rank
    already has). Samples a rank does not train on keep no top-k there."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return samples
    k = broadcast(topk_width(samples) if this_rank == 0 and topk_wanted is not None else 0, this_rank)
    if not k:
        return broadcast(samples, this_rank)
    light = broadcast(without_topk(samples) if this_rank == 0 else None, this_rank)
    wanted: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(wanted, topk_wanted(light))
    if this_rank == 0:
        for dst in range(1, len(wanted)):
            if wanted[dst]:
                for flat in pack_topk(samples, wanted[dst]):
                    dist.send(torch.from_numpy(flat).to(device or "cpu"), dst=dst)
        return samples
    mine = wanted[this_rank]
    if mine:
        rows = sum(len(light[i].response_ids) for i in mine)
        ids, lps = torch.empty(rows, k, dtype=torch.int32, device=device), torch.empty(rows, k, device=device)
        dist.recv(ids, src=0)
        dist.recv(lps, src=0)
        unpack_topk(light, mine, ids.cpu().numpy(), lps.cpu().numpy())
    return light


def topk_width(samples: Sequence[Sample]) -> int:
    """k of the samples' teacher top-k columns; 0 when they carry none."""
    return max((s.teacher_topk_ids.shape[-1] for s in samples if s.teacher_topk_ids is not None), default=0)


def without_topk(samples: Sequence[Sample]) -> list[Sample]:
    import dataclasses

    return [dataclasses.replace(s, teacher_topk_ids=None, teacher_topk_logprobs=None) for s in samples]


def pack_topk(samples: Sequence[Sample], indices: Sequence[int]) -> tuple:
    """The top-k rows of samples[indices], concatenated: (int32 ids [R, k], float32 log-probs [R, k])."""
    import numpy as np

    return (
        np.ascontiguousarray(np.concatenate([samples[i].teacher_topk_ids for i in indices]), dtype=np.int32),
        np.ascontiguousarray(np.concatenate([samples[i].teacher_topk_logprobs for i in indices]), dtype=np.float32),
    )


def unpack_topk(samples: Sequence[Sample], indices: Sequence[int], ids, logprobs) -> None:
    """Inverse of pack_topk: each sample's rows (len(response_ids) of them) as views of the flat arrays."""
    at = 0
    for i in indices:
        n = len(samples[i].response_ids)
        samples[i].teacher_topk_ids, samples[i].teacher_topk_logprobs = ids[at : at + n], logprobs[at : at + n]
        at += n
    if at != len(ids):
        raise ValueError(f"top-k rows: received {len(ids)}, the samples' responses hold {at}")


# ----------------------------------------------------------------------------- trainer
def build_trainer(cfg: RunConfig, objective: Objective) -> MegatronTrainer:
    """The Megatron student, initialised from the HF folder `model.student` (each rank loads its shard)."""
    from rlad_megatron.backends.megatron.checkpoint_convert import load_hf_weights
    from rlad_megatron.backends.megatron.parallel import init_parallel
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer

    parallel = init_parallel(cfg.parallel, cfg.seed)
    return MegatronTrainer(
        cfg,
        objective,
        parallel=parallel,
        weight_loader=lambda chunks, hf_dir: load_hf_weights(chunks, hf_dir, tp_group=parallel.tp_group),
    )


def push_weights(run: Run, version: int) -> None:
    """Trainer -> rollout engine. Collective over the trainer ranks.

    Three paths, chosen from config alone so every rank agrees:
    - an in-process engine (kind=embedded, rank 0 owns it): without pipeline parallelism rank 0 receives
      every HF tensor in memory (TP-gathered buckets); with it, the stages write one HF folder together
      and the engine reloads it;
    - servers with `rollout.sync=distributed` (the default): SGLang's update-from-distributed protocol,
      one named group per pipeline stage (`sync_over_wire`);
    - servers with `rollout.sync=disk`: the stages write one HF folder, every server loads it
      (/update_weights_from_disk; the folder must be readable by the servers).
    """
    from rlad_megatron.backends.megatron.weight_export import export_hf_tensors

    trainer, engine = run.trainer, run.source_ctx.rollout_engine
    in_process = engine_kind(run.cfg.rollout) == "embedded"
    if not in_process and run.cfg.rollout.sync == "distributed":
        sync_over_wire(run, version)
        return
    # Expert parallelism: each EP rank holds only its experts, so they meet in one folder on disk.
    if (
        trainer.parallel.pipeline_model_parallel_size > 1
        or trainer.parallel.expert_model_parallel_size > 1
        or not in_process
    ):
        folder = save_hf(run, Path(run.cfg.run_dir) / "weights", version)
        if engine is not None:
            engine.update_weights(path=str(folder), version=version)
        return
    if trainer.parallel.dp_cp_rank != 0:  # one copy of the weights per TP x PP layout
        return
    for bucket in export_hf_tensors(trainer.unwrapped_model(), tp_group=trainer.parallel.tp_group):
        if engine is not None:
            engine.update_weights(named_tensors=bucket, version=version)


def engine_kind(engine_cfg) -> str:
    from rlad_megatron.engines.factory import resolve_kind

    return resolve_kind(engine_cfg)


def sync_over_wire(run: Run, version: int) -> None:
    """Every pipeline stage broadcasts its own HF buckets into every live server (engines/weight_sync.py).

    Rank 0 owns the engine: it finds the live servers, opens and closes the update window and checks
    that every server then reports `version`. Each stage's DP=0 / TP=0 rank sends, stage after stage; the
    stage's other TP ranks take part in the TP gathers; other DP (and CP) replicas wait at the barriers."""
    from rlad_megatron.backends.megatron.weight_export import export_hf_tensors
    from rlad_megatron.engines.weight_sync import ServerCalls, StageSender, default_sync_host

    c, cfg, engine = run.trainer.parallel, run.cfg.rollout, run.source_ctx.rollout_engine
    if c.expert_model_parallel_size > 1:
        raise ValueError(
            "rollout.sync='distributed' sends each stage's buckets from one rank, which holds only its own "
            "experts under parallel.expert_model_parallel_size > 1; use rollout.sync='disk'"
        )
    wire = run.weight_wire
    if wire is None:
        calls = ServerCalls(resolve_api_key(cfg), timeout_s=cfg.sync_timeout_s)
        backend = "nccl" if c.device.type == "cuda" else "gloo"
        wire = run.weight_wire = StageSender(
            c.pp_rank, calls, cfg.sync_host or default_sync_host(), backend, cfg.sync_timeout_s
        )
    members, restarted = broadcast(engine.sync_members() if engine is not None else None, c.rank)
    sender = c.dp_cp_rank == 0 and c.tp_rank == 0
    if members != wire.members or restarted:
        generation = broadcast(engine.sync_generation + 1 if engine is not None else None, c.rank)
        if engine is not None:
            engine.sync_generation = generation
        if sender:
            wire.connect(members, generation)
    if c.rank == 0:
        wire.calls.post_all(members, "/begin_weight_update", {})
    _barrier()
    # One stage at a time: a server handles one update call at a time, so two stages sending at once could
    # each hold a different server and wait for the other forever.
    for stage in range(c.pipeline_model_parallel_size):
        if c.dp_cp_rank == 0 and c.pp_rank == stage:
            for bucket in export_hf_tensors(run.trainer.unwrapped_model(), tp_group=c.tp_group, to_first=True):
                wire.send(bucket, version)  # only the TP rank 0 of the stage gets buckets
        _barrier()
    if c.rank == 0:
        wire.calls.post_all(members, "/end_weight_update", {})
        engine.synced(members, version, wire.calls.versions(members))
    wire.members = list(members)  # every rank remembers the membership, so all agree when it changes next


def resolve_api_key(engine_cfg) -> str:
    from rlad_megatron.engines.factory import resolve_api_key as resolve

    return resolve(engine_cfg)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_hf(run: Run, root: Path, step: int) -> Path:
    """Collective: the live student as an HF folder `<root>/step_N` (`<root>/latest` points at it)."""
    from rlad_megatron.backends.megatron.weight_export import write_hf_folder

    c = run.trainer.parallel
    return write_hf_folder(
        run.trainer.unwrapped_model(),
        root,
        step,
        hf_config_dir=run.cfg.model.student,
        tp_group=c.tp_group,
        pp_group=c.pp_group,
        dp_rank=c.dp_cp_rank,  # one writer per TP x PP shard (CP ranks hold the same weights)
        ep_rank=c.ep_rank,
        expert_dp_rank=c.expert_dp_rank,
    )


def save(run: Run, step: int, extra: dict[str, Any]) -> None:
    from rlad_megatron.backends.megatron.checkpoint import save_checkpoint

    save_checkpoint(run.trainer, run.cfg.run_dir, step, extra, keep_last=run.cfg.checkpoint.keep_last)


def load(run: Run) -> tuple[int, dict[str, Any]] | None:
    """(step, extra_state) of the latest complete checkpoint, loaded into the trainer; None if there is none."""
    if run.trainer is None:
        return None
    from rlad_megatron.backends.megatron.checkpoint import load_latest

    return load_latest(run.trainer, run.cfg.run_dir)


def has_checkpoint(run: Run) -> bool:
    from rlad_megatron.backends.megatron.checkpoint import latest_checkpoint

    return latest_checkpoint(run.cfg.run_dir) is not None


# ----------------------------------------------------------------------------- data and reward
def trace_fn(cfg: RunConfig) -> Callable[[dict[str, Any]], str]:
    """The reference solution of a row: its `solution` field, else the procedural task's trace."""
    from rlad_megatron.tasks import solution_trace

    def trace(record: dict[str, Any]) -> str:
        return str(record["solution"]) if record.get("solution") else solution_trace(record)

    return trace


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def build_source_context(cfg: RunConfig, objective: Objective, source: Source, *, with_engines: bool) -> SourceContext:
    from rlad_megatron.data.loader import load_prompts
    from rlad_megatron.data.sampler import PromptSampler
    from rlad_megatron.rewards import build_reward_fn

    tokenizer = load_tokenizer(cfg.model.student)
    dataset = load_prompts(cfg.data.train, cfg.data, tokenizer, split="train", seed=cfg.seed)
    sampler = PromptSampler(dataset.records, seed=cfg.seed, shuffle=cfg.data.shuffle)
    ctx = SourceContext(
        cfg=cfg,
        objective=objective,
        tokenizer=tokenizer,
        sampler=sampler,
        reward_fn=build_reward_fn(cfg.reward, cfg.data),
    )
    if with_engines:
        from rlad_megatron.engines.factory import fleet_gpu_offsets

        wanted = {"rollout": wants_rollout_engine(cfg, source), "teacher": wants_teacher_engine(objective, source)}
        # fleets launched here go on GPUs after the trainer's local ranks, never on top of them or each other
        offsets = fleet_gpu_offsets({role: getattr(cfg, role) for role, want in wanted.items() if want})
        if wanted["rollout"]:
            ctx.rollout_engine = build_engine(
                cfg.rollout, cfg.model.student, "rollout", offsets["rollout"], record_routes=cfg.model.routing_replay
            )
        if wanted["teacher"]:
            ctx.teacher_engine = build_engine(cfg.teacher, cfg.model.teacher, "teacher", offsets["teacher"])
    return ctx


def wants_rollout_engine(cfg: RunConfig, source: Source) -> bool:
    """The student engine: to sample rollouts, or to evaluate. Decided from config alone, so every
    rank agrees on whether weight sync (a collective) happens."""
    return bool(source.needs_rollout_engine or (cfg.data.eval and cfg.train.mode == "full"))


def wants_teacher_engine(objective, source) -> bool:
    """The teacher engine: to score samples the source did not bring scored, or to generate them."""
    return bool((objective.needs_teacher and not source.scored) or source.needs_teacher)


def build_engine(engine_cfg, model_dir: str, role: str, gpu_offset: int = 0, record_routes: bool = False):
    from rlad_megatron.engines import build_engine as build

    return build(engine_cfg, model_dir, role, gpu_offset=gpu_offset, record_routes=record_routes)


def eval_records(cfg: RunConfig) -> Sequence[dict[str, Any]]:
    if not cfg.data.eval:
        return ()
    from rlad_megatron.data.loader import load_prompts

    records = load_prompts(
        cfg.data.eval, cfg.data, load_tokenizer(cfg.model.student), split="test", seed=cfg.seed
    ).records
    return records[: cfg.eval.max_prompts] if cfg.eval.max_prompts else records


# ----------------------------------------------------------------------------- teacher and eval
def score_teacher(run: Run, samples: Sequence[Sample]) -> None:
    """teacher_logprobs (and top-k for GKD) on the student's exact ids, in place."""
    from rlad_megatron.teacher import score_samples

    score_samples(
        run.source_ctx.teacher_engine,
        samples,
        top_k=run.objective.teacher_top_k,
        drop_final_eos=run.cfg.algorithm.drop_final_eos_from_teacher,
    )


def evaluate(run: Run, step: int) -> dict[str, float]:
    """avg@k / pass@k of the rollout engine's current weights on the held-out prompts, overall, plus avg@k per
    value of each eval.breakdown_keys path (`difficulty=4/avg@k`); again for each eval.extra_temperatures with
    the suffix `@T<t>`."""
    from rlad_megatron.engines.base import SamplingParams
    from rlad_megatron.eval.evaluate import evaluate as run_eval

    e = run.cfg.eval
    metrics: dict[str, float] = {}
    for index, temperature in enumerate([e.temperature, *e.extra_temperatures]):
        # The same seed at every eval: the curve then compares weights, not sampling luck.
        sampling = SamplingParams(
            temperature=temperature,
            top_p=e.top_p,
            max_new_tokens=e.max_new_tokens,
            seed=(run.cfg.seed * 7919 + 17) % (2**31 - 1),
        )
        result = run_eval(
            run.source_ctx.rollout_engine,
            run.source_ctx.tokenizer,
            run.eval_records,
            run.source_ctx.reward_fn,
            k=e.num_samples,
            sampling=sampling,
            batch_size=e.batch_size,
            breakdown_keys=e.breakdown_keys,
            max_prompts=e.max_prompts,
        )
        avg = f"avg@{e.num_samples}"
        found = dict(result["overall"])
        for path, by_value in result["breakdown"].items():
            found.update({f"{path}={value}/{avg}": m[avg] for value, m in by_value.items()})
        suffix = "" if index == 0 else f"@T{temperature:g}"
        metrics.update({f"{key}{suffix}": value for key, value in found.items()})
    return metrics


def close(run: Run) -> None:
    for engine in (run.source_ctx.rollout_engine, run.source_ctx.teacher_engine) if run is not None else ():
        if engine is not None:
            engine.close()
    if run is not None and run.trainer is not None:
        from rlad_megatron.backends.megatron.parallel import destroy_parallel

        destroy_parallel(run.trainer.parallel)
