"""How the training loop builds and talks to the other packages (one function per seam).

train.py reads like pseudocode because every call into data/, rewards/, engines/, teacher/,
eval/, conversion/ and backends/megatron/ goes through a function here: build the trainer,
the engines, the data and the reward; score with the teacher; broadcast samples to the
trainer ranks; push weights to the rollout engine; evaluate; save and load checkpoints.
Left out: engines on ranks other than 0 (they receive samples by broadcast instead).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist

from rlad_megatron.engines.factory import resolve_api_key, resolve_kind
from rlad_megatron.sample_sources import Source, SourceContext
from rlad_megatron.types import TOKEN_COLUMNS, AbsentColumn, Sample

if TYPE_CHECKING:
    from rlad_megatron.algorithms.objectives import Objective
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.config import RunConfig
    from rlad_megatron.engines.client import HttpEngine
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


def broadcast_samples(samples: list[Sample] | None, this_rank: int, columns_wanted=None, device=None) -> list[Sample]:
    """Rank 0's samples on every rank.

    Without `columns_wanted` (no trainer on this rank): one `broadcast_object_list` of the whole samples. With
    it, the per-sample metadata (reward, group index, record, finish_reason, response text...) is pickled to
    every rank with each per-token column (`TOKEN_COLUMNS`: prompt and response ids, rollout and teacher
    log-probs, GKD's top-k) replaced by an `AbsentColumn` of its shape; then each rank gets the values of only
    what `columns_wanted(samples)` names ({column: sample indices}: what its data-parallel rank reads), one
    flat tensor per column in the column's dtype (`pack_columns`), sent by rank 0 point to point. Each
    received column is a numpy view into them (`unpack_columns`; offsets from the lengths every rank already
    has); the rest keep their `AbsentColumn`s (lengths only). Rank 0 keeps its own samples as they are."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        assert samples is not None, "a single process is rank 0, which holds the samples"
        return samples
    if columns_wanted is None:
        return broadcast(samples, this_rank)
    light = broadcast(without_columns(samples) if samples is not None else None, this_rank)  # samples: rank 0
    wanted: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(wanted, columns_wanted(light))
    if this_rank == 0:
        assert samples is not None, "rank 0 holds the samples"
        for dst in range(1, len(wanted)):
            for flat in pack_columns(samples, wanted[dst]).values():
                dist.send(torch.from_numpy(flat).to(device or "cpu"), dst=dst)
        return samples
    received = {}
    for name, (dtype, shape) in column_layout(light, wanted[this_rank]).items():
        buffer = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, device=device)
        dist.recv(buffer, src=0)
        received[name] = buffer.cpu().numpy()
    unpack_columns(light, wanted[this_rank], received)
    return light


Selection = Mapping[str, Sequence[int]]
"""Per-token column name -> indices of the samples whose values of that column are wanted."""


def without_columns(samples: Sequence[Sample]) -> list[Sample]:
    """Copies of the samples whose per-token columns are `AbsentColumn`s of the same shape (None stays None)."""
    return [dataclasses.replace(s, **_absent_columns(s)) for s in samples]


def _absent_columns(s: Sample) -> dict[str, Any]:
    return {
        name: AbsentColumn(name, _shape(value)) for name in TOKEN_COLUMNS if (value := getattr(s, name)) is not None
    }


def _shape(column: Any) -> tuple[int, ...]:
    return tuple(column.shape) if isinstance(column, np.ndarray | AbsentColumn) else (len(column),)


def column_layout(samples: Sequence[Sample], selection: Selection) -> dict[str, tuple[type, tuple[int, ...]]]:
    """(dtype, flat shape) of each column `pack_columns(samples, selection)` packs, in packing order
    (`TOKEN_COLUMNS`' order), from the samples' shapes alone (an `AbsentColumn` has one): the selected columns
    with at least one row among the selected samples that hold them (not None), their rows stacked. Sender and
    receiver both compute it, so they agree on every message."""
    layout = {}
    for name, dtype in TOKEN_COLUMNS.items():
        shapes = [_shape(c) for c in _present(samples, selection.get(name, ()), name)]
        rows = sum(shape[0] for shape in shapes)
        if rows:
            trailing = {shape[1:] for shape in shapes if shape[0]}
            if len(trailing) != 1:
                raise ValueError(f"{name}: the samples disagree on the shape of a row: {sorted(trailing)}")
            layout[name] = (dtype, (rows, *trailing.pop()))
    return layout


def _present(samples: Sequence[Sample], indices: Sequence[int], name: str) -> list[Any]:
    return [column for i in indices if (column := getattr(samples[i], name)) is not None]


def column_offsets(samples: Sequence[Sample], indices: Sequence[int], name: str) -> np.ndarray:
    """Where each of samples[indices]' rows of column `name` start in its flat array, then where the last
    ends ([len(indices) + 1]; a sample whose column is None takes no rows)."""
    lengths = [len(c) if (c := getattr(samples[i], name)) is not None else 0 for i in indices]
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def pack_columns(samples: Sequence[Sample], selection: Selection) -> dict[str, np.ndarray]:
    """Each column of `column_layout(samples, selection)`: the rows of its selected samples, concatenated in
    selection order, as one contiguous array of the column's dtype (`TOKEN_COLUMNS`). Token ids out of the
    dtype's range are refused rather than wrapped."""
    packed: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in column_layout(samples, selection).items():
        parts = [_as_dtype(c, dtype, name) for c in _present(samples, selection[name], name) if len(c)]
        flat: np.ndarray = np.ascontiguousarray(np.concatenate(parts), dtype=dtype)
        if flat.shape != shape:
            raise ValueError(f"{name}: packed shape {flat.shape}, the samples' lengths give {shape}")
        packed[name] = flat
    return packed


def _as_dtype(values: Any, dtype: type, name: str) -> np.ndarray:
    array = np.asarray(values)
    if np.issubdtype(dtype, np.integer) and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(
                f"{name} holds values in [{array.min()}, {array.max()}], beyond {np.dtype(dtype).name}; "
                f"widen TOKEN_COLUMNS[{name!r}] in rlad_megatron/types.py"
            )
    return array.astype(dtype, copy=False)


def unpack_columns(samples: Sequence[Sample], selection: Selection, flats: Mapping[str, np.ndarray]) -> None:
    """Inverse of `pack_columns`, in place: each selected sample's column becomes its rows of the flat array
    (a view, no copy), at `column_offsets`. A column `flats` lacks (no selected sample held rows of it) keeps
    what the samples hold."""
    for name, flat in flats.items():
        indices = selection[name]
        offsets = column_offsets(samples, indices, name)
        if offsets[-1] != len(flat):
            raise ValueError(f"{name}: received {len(flat)} rows, the selected samples' lengths hold {offsets[-1]}")
        for i, start, end in zip(indices, offsets[:-1], offsets[1:]):
            if getattr(samples[i], name) is not None:
                setattr(samples[i], name, flat[start:end])


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

    trainer, engine = run.active_trainer, run.source_ctx.rollout_engine
    in_process = resolve_kind(run.cfg.rollout) == "embedded"
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


def sync_over_wire(run: Run, version: int) -> None:
    """Every pipeline stage broadcasts its own HF buckets into every live server (engines/weight_sync.py).

    Rank 0 owns the engine: it finds the live servers, opens and closes the update window and checks
    that every server then reports `version`. Each stage's DP=0 / TP=0 rank sends, stage after stage; the
    stage's other TP ranks take part in the TP gathers; other DP (and CP) replicas wait at the barriers."""
    from rlad_megatron.backends.megatron.weight_export import export_hf_tensors
    from rlad_megatron.engines.weight_sync import ServerCalls, StageSender, default_sync_host

    # over the wire only to HTTP engines (fleets of servers): they track the sync membership and generation
    engine = cast("HttpEngine | None", run.source_ctx.rollout_engine)
    c, cfg = run.active_trainer.parallel, run.cfg.rollout
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
            for bucket in export_hf_tensors(run.active_trainer.unwrapped_model(), tp_group=c.tp_group, to_first=True):
                wire.send(bucket, version)  # only the TP rank 0 of the stage gets buckets
        _barrier()
    if c.rank == 0:
        assert engine is not None  # rank 0 owns the engines
        wire.calls.post_all(members, "/end_weight_update", {})
        engine.synced(members, version, wire.calls.versions(members))
    wire.members = list(members)  # every rank remembers the membership, so all agree when it changes next


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_hf(run: Run, root: Path, step: int) -> Path:
    """Collective: the live student as an HF folder `<root>/step_N` (`<root>/latest` points at it)."""
    from rlad_megatron.backends.megatron.weight_export import write_hf_folder

    c = run.active_trainer.parallel
    return write_hf_folder(
        run.active_trainer.unwrapped_model(),
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

    save_checkpoint(run.active_trainer, run.cfg.run_dir, step, extra, keep_last=run.cfg.checkpoint.keep_last)


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
    # several teachers: every row is routed (and an unknown teacher refused) here, before any generation
    dataset = load_prompts(
        cfg.data.train, cfg.data, tokenizer, split="train", seed=cfg.seed, teachers=list(cfg.teachers)
    )
    sampler = PromptSampler(dataset.records, seed=cfg.seed, shuffle=cfg.data.shuffle)
    ctx = SourceContext(
        cfg=cfg,
        objective=objective,
        tokenizer=tokenizer,
        sampler=sampler,
        reward_fn=build_reward_fn(cfg.reward, cfg.data),
    )
    if with_engines:
        from rlad_megatron.config import SINGLE_TEACHER, teachers_of
        from rlad_megatron.engines.factory import fleet_gpu_offsets

        teachers = teachers_of(cfg) if wants_teacher_engine(objective, source) else []
        fleets = {t.section: t.engine for t in teachers}
        if wants_rollout_engine(cfg, source):
            fleets["rollout"] = cfg.rollout
        # fleets launched here go on GPUs after the trainer's local ranks, never on top of them or each other
        offsets = fleet_gpu_offsets(fleets)
        if "rollout" in fleets:
            ctx.rollout_engine = build_engine(
                cfg.rollout, cfg.model.student, "rollout", offsets["rollout"], record_routes=cfg.model.routing_replay
            )
        for t in teachers:
            engine = build_engine(t.engine, t.model, "teacher", offsets[t.section], name=t.name)
            if t.name == SINGLE_TEACHER:
                ctx.teacher_engine = engine
            else:
                ctx.teacher_engines[t.name] = engine
    return ctx


def wants_rollout_engine(cfg: RunConfig, source: Source) -> bool:
    """The student engine: to sample rollouts, or to evaluate. Decided from config alone, so every
    rank agrees on whether weight sync (a collective) happens."""
    return bool(source.needs_rollout_engine or (cfg.data.eval and cfg.train.mode == "full"))


def wants_teacher_engine(objective, source) -> bool:
    """The teacher engine: to score samples the source did not bring scored, or to generate them."""
    return bool((objective.needs_teacher and not source.scored) or source.needs_teacher)


def build_engine(
    engine_cfg, model_dir: str, role: str, gpu_offset: int = 0, name: str = "", record_routes: bool = False
):
    """`name`: a named teacher's name (its launched fleet logs to logs/teacher_<name>_fleet); `record_routes`:
    the rollout engine returns the experts it routed each token to (model.routing_replay)."""
    from rlad_megatron.engines import build_engine as build

    named = {"log_dir": f"logs/{role}_{name}_fleet"} if name else {}
    return build(engine_cfg, model_dir, role, gpu_offset=gpu_offset, record_routes=record_routes, **named)


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
    """teacher_logprobs (and top-k for GKD) on the student's exact ids, in place; each sample by its own
    teacher (several teachers: at the same time, one thread per teacher)."""
    from rlad_megatron.sample_sources import score_with_teachers

    score_with_teachers(
        run.source_ctx.engines_by_teacher(),
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
    engines = [run.source_ctx.rollout_engine, *run.source_ctx.engines_by_teacher().values()] if run is not None else []
    for engine in engines:
        if engine is not None:
            engine.close()
    if run is not None and run.trainer is not None:
        release_trainer(run.trainer)


def release_trainer(trainer: MegatronTrainer) -> None:
    """End the trainer's process groups (a run that failed while being built must not leave them behind)."""
    from rlad_megatron.backends.megatron.parallel import destroy_parallel

    destroy_parallel(trainer.parallel)
