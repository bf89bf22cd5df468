"""Shared set-up of the training-loop tests: tiny student / teacher models and a run config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlad_megatron.config import RunConfig, load_config
from rlad_megatron.rewards.base import RewardResult

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def make_models(root: Path) -> tuple[Path, Path]:
    """A tiny llama student and a (different, wider) llama teacher sharing the char tokenizer."""
    from rlad_megatron.tiny_models import save_tiny_model

    student, teacher = root / "student", root / "teacher"
    if not (student / "config.json").exists():
        save_tiny_model(student, "llama", seed=1, **TINY)
        save_tiny_model(teacher, "llama", seed=2, **dict(TINY, hidden_size=48, intermediate_size=96))
    return student, teacher


def digit_reward(response_text: str, record) -> RewardResult:
    """Test reward with spread inside a group even for random models: the share of digits."""
    score = sum(c.isdigit() for c in response_text) / max(len(response_text), 1)
    return RewardResult(score, {"correct": score >= 0.25})


def run_config(root: Path, algorithm: str, overrides: Sequence[str] = ()) -> RunConfig:
    student, teacher = make_models(root.parent)
    base = [
        f"run_dir={root}",
        "seed=7",
        f"model.student={student}",
        f"model.teacher={teacher}",
        f"algorithm.name={algorithm}",
        "algorithm.group_size=2",
        "rollout.kind=embedded",
        "teacher.kind=embedded",
        "rollout.max_new_tokens=6",
        "data.train=task:addition",
        "data.task_kwargs.size=32",
        "train.num_steps=2",
        "train.prompts_per_step=2",
        "train.lr=0.01",
        "checkpoint.interval=0",
        "checkpoint.save_hf=true",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
    ]
    return load_config(None, base + list(overrides))


def subprocess_env() -> dict:
    """Environment for a child run: one thread, and none of the torch.distributed variables an
    in-process run of this pytest session left behind (init_parallel sets them for world size 1)."""
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env
