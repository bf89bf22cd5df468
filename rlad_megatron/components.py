"""How the training loop builds and talks to the other packages (one function per seam).

train.py reads like pseudocode because every call into data/, rewards/, rollout/, teacher/,
eval/, conversion/ and backends/megatron/ goes through a function here: build the trainer,
the engines, the data and the reward; score with the teacher; broadcast samples to the
trainer ranks; push weights to the rollout engine; evaluate; save and load checkpoints.
Left out: engines on ranks other than 0 (they receive samples by broadcast instead).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from rlad_megatron.rollouts import Context
from rlad_megatron.types import Sample


# ----------------------------------------------------------------------------- processes
def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def broadcast(samples: List[Sample], src_rank: int) -> List[Sample]:
    """Rank 0's samples on every rank (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return samples
    box = [samples if src_rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- trainer
def build_trainer(cfg, objective):
    """The Megatron student, initialised from the HF folder `model.student`."""
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.backends.megatron.weight_export import load_hf_weights

    return MegatronTrainer(cfg, objective, weight_loader=load_hf_weights)


def push_weights(run, version: int) -> None:
    """Collective export of HF-named tensors in buckets; rank 0 loads them into its engine."""
    from rlad_megatron.backends.megatron.weight_export import export_hf_buckets

    engine = run.ctx.rollout_engine
    for bucket in export_hf_buckets(run.trainer):
        if engine is not None:
            engine.update_weights(named_tensors=bucket, version=version)


def save_hf(run, out_dir: Path) -> None:
    from rlad_megatron.backends.megatron.weight_export import save_hf_folder

    save_hf_folder(run.trainer, out_dir, tokenizer_dir=run.cfg.model.student)


def save(run, step: int, extra: Dict[str, Any]) -> None:
    from rlad_megatron.backends.megatron.checkpoint import save_checkpoint

    save_checkpoint(run.trainer, run.cfg.run_dir, step, extra, keep_last=run.cfg.checkpoint.keep_last)


def load(run) -> Optional[Tuple[int, Dict[str, Any]]]:
    """(step, extra_state) of the latest complete checkpoint, loaded into the trainer; None if there is none."""
    if run.trainer is None:
        return None
    from rlad_megatron.backends.megatron.checkpoint import load_latest

    return load_latest(run.trainer, run.cfg.run_dir)


def has_checkpoint(run) -> bool:
    from rlad_megatron.backends.megatron.checkpoint import latest_checkpoint

    return latest_checkpoint(run.cfg.run_dir) is not None


# ----------------------------------------------------------------------------- data and reward
def trace_fn(cfg) -> Callable[[Dict[str, Any]], str]:
    """The reference solution of a row: its `solution` field, else the procedural task's trace."""
    from rlad_megatron.tasks import solution_trace

    def trace(record: Dict[str, Any]) -> str:
        return str(record["solution"]) if record.get("solution") else solution_trace(record)

    return trace


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def eos_ids(tokenizer) -> List[int]:
    eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])


def build_context(cfg, objective, source, *, with_engines: bool) -> Context:
    from rlad_megatron.data.loader import load_prompts
    from rlad_megatron.data.sampler import PromptSampler
    from rlad_megatron.rewards import build_reward

    tokenizer = load_tokenizer(cfg.model.student)
    dataset = load_prompts(cfg.data.train, cfg.data, tokenizer, split="train", seed=cfg.seed)
    sampler = PromptSampler(dataset.records, seed=cfg.seed, shuffle=cfg.data.shuffle)
    ctx = Context(cfg=cfg, objective=objective, tokenizer=tokenizer, sampler=sampler,
                  reward_fn=build_reward(cfg.reward, cfg.data.train))
    if with_engines:
        if getattr(source, "needs_rollout_engine", False) or cfg.eval.max_prompts >= 0 and cfg.data.eval:
            ctx.rollout_engine = build_engine(cfg.rollout, cfg.model.student, "rollout")
        if objective.needs_teacher or getattr(source, "needs_teacher", False):
            ctx.teacher_engine = build_engine(cfg.teacher, cfg.model.teacher, "teacher")
    return ctx


def build_engine(engine_cfg, model_dir: str, role: str):
    from rlad_megatron.rollout import build_engine as build

    return build(engine_cfg, model_dir, role)


def eval_records(cfg) -> Sequence[Dict[str, Any]]:
    if not cfg.data.eval:
        return ()
    from rlad_megatron.data.loader import load_prompts

    records = load_prompts(cfg.data.eval, cfg.data, load_tokenizer(cfg.model.student), split="test",
                           seed=cfg.seed).records
    return records[: cfg.eval.max_prompts] if cfg.eval.max_prompts else records


# ----------------------------------------------------------------------------- teacher and eval
def score_teacher(run, samples: Sequence[Sample]) -> None:
    """teacher_logprobs (and top-k for GKD) on the student's exact ids, in place."""
    from rlad_megatron.teacher import score_samples

    score_samples(run.ctx.teacher_engine, samples, top_k=run.objective.teacher_top_k,
                  drop_final_eos=run.cfg.algorithm.drop_final_eos_from_teacher)


def evaluate(run, step: int) -> Dict[str, float]:
    """avg@k / pass@k of the rollout engine's current weights on the held-out prompts."""
    from rlad_megatron.eval import evaluate as run_eval

    cfg = run.cfg
    seed = (cfg.seed * 7919 + 17) % (2**31 - 1)  # the same eval draws at every step: curves compare weights only
    return run_eval(run.ctx.rollout_engine, run.eval_records, tokenizer=run.ctx.tokenizer,
                    reward_fn=run.ctx.reward_fn, eval_cfg=cfg.eval, data_cfg=cfg.data, seed=seed)


def close(run) -> None:
    for engine in (run.ctx.rollout_engine, run.ctx.teacher_engine) if run is not None else ():
        if engine is not None:
            engine.close()
    if run is not None and run.trainer is not None:
        from rlad_megatron.backends.megatron.parallel import destroy_parallel

        destroy_parallel(run.trainer.ctx)
