"""Shared starting point of the method comparison: data files, a trained teacher, a warm-started student.

Every method in bench/compare_methods.py starts from the SAME student folder and uses the SAME
teacher folder and the SAME train / held-out prompt files, all built here once per task and
cached under `<work>/<task>/`:
  train.jsonl / test.jsonl   procedural-task records (hash-held-out split, fixed seed 0), with the
                             fields `task`, `difficulty` kept as metadata so reference traces and
                             per-difficulty breakdowns work from the files;
  teacher/                   a wider char-level llama trained by SFT on the task's reference traces
                             (the project's own `sft` algorithm with train.offline_source=dataset);
  student/                   a narrower llama given a SHORT SFT warm start (so its rollouts get some
                             reward and GRPO has signal), the common initialisation of every method.
If the CPU demo (examples/cpu_demo/run_demo.py) exposes `build_teacher_student(work_dir, task)`,
its artifacts are used instead, so the comparison and the demo share one teacher and student.
Left out: reasoning-gym tasks (their prompts are far longer than a tiny char model can learn in
minutes on CPU); teachers trained by RL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "examples" / "cpu_demo" / "run_demo.py"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


@dataclass(frozen=True)
class Setup:
    """How one task's teacher and student are made (sizes live in compare_methods.SIZES)."""

    task: str
    difficulties: tuple[int, ...] = (1, 2, 3)
    num_train: int = 4000
    num_test: int = 96
    teacher: ModelShape = ModelShape(64, 192, 2)
    student: ModelShape = ModelShape(32, 96, 2)
    teacher_sft_steps: int = 600
    teacher_lr: float = 3e-3
    student_sft_steps: int = 60
    student_lr: float = 3e-3
    max_new_tokens: int = 48
    extra: dict[str, Any] = field(default_factory=dict)


def _records(task: str, size: int, split: str, difficulties: Sequence[int]) -> list[dict[str, Any]]:
    from rlad_megatron.tasks import solution_trace, task_records

    rows = task_records(task, size, seed=0, split=split, difficulties=list(difficulties))
    # top-level task / difficulty become the record's metadata (data.metadata_keys), so the
    # `dataset` offline source can rebuild each reference trace from a plain jsonl file.
    return [
        dict(r, solution=solution_trace(r), task=r["metadata"]["task"], difficulty=r["metadata"]["difficulty"])
        for r in rows
    ]


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def data_files(setup: Setup, root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    train, test = root / "train.jsonl", root / "test.jsonl"
    if not train.exists():
        write_jsonl(train, _records(setup.task, setup.num_train, "train", setup.difficulties))
    if not test.exists():
        write_jsonl(test, _records(setup.task, setup.num_test, "test", setup.difficulties))
    return train, test


def common_overrides(setup: Setup, train: Path, test: Path) -> list[str]:
    """Data, reward, engines and logging shared by every run on this task (SFT set-up and comparison)."""
    return [
        f"data.train={train}",
        f"data.eval={test}",
        "data.metadata_keys=[task,difficulty]",
        f"reward.name=task:{setup.task}",
        "rollout.kind=embedded",
        "teacher.kind=embedded",
        f"rollout.max_new_tokens={setup.max_new_tokens}",
        f"eval.max_new_tokens={setup.max_new_tokens}",
        "eval.breakdown_keys=[difficulty]",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        "logging.rollout_samples=0",
    ]


def _sft(init: Path, run_dir: Path, steps: int, lr: float, common: list[str], seed: int) -> Path:
    """The project's sft algorithm on reference traces; returns the exported HF folder."""
    from rlad_megatron.config import load_config
    from rlad_megatron.conversion.hf_io import resolve_latest
    from rlad_megatron.train import HF_DIR, train

    overrides = common + [
        f"run_dir={run_dir}",
        f"seed={seed}",
        f"model.student={init}",
        "algorithm.name=sft",
        "train.offline_source=dataset",
        "algorithm.group_size=1",
        f"train.num_steps={steps}",
        "train.prompts_per_step=32",
        f"train.lr={lr}",
        "train.lr_decay_style=cosine",
        f"train.min_lr={lr / 10}",
        "checkpoint.interval=0",
        f"eval.interval={steps}",  # before training and after the last step
        "eval.num_samples=4",
        "eval.temperature=1.0",
    ]
    train(load_config(None, overrides), resume=False)
    return Path(resolve_latest(run_dir / HF_DIR))


def _link(src: Path, dst: Path) -> Path:
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    # relative, so a prepared folder can be moved or copied whole
    tmp.symlink_to(os.path.relpath(src.resolve(), dst.parent.resolve()), target_is_directory=True)
    tmp.replace(dst)
    return dst


def demo_builder():
    """`build_teacher_student(work_dir, task) -> (teacher_dir, student_dir)` from the CPU demo, if it has one."""
    if not DEMO.exists():
        return None
    spec = importlib.util.spec_from_file_location("rlad_cpu_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception:  # noqa: BLE001 - a demo mid-change must not stop the benchmark: use our builder
        return None
    return getattr(module, "build_teacher_student", None)


def prepare(setup: Setup, root: Path) -> dict[str, Path]:
    """Build (or reuse) data, teacher and student for one task; safe to call from several processes."""
    from rlad_megatron.tiny_models import save_tiny_model

    train, test = data_files(setup, root)
    teacher, student = root / "teacher", root / "student"
    if (teacher / "config.json").exists() and (student / "config.json").exists():
        return {"train": train, "test": test, "teacher": teacher, "student": student}
    lock = _claim(root / "prepare.lock")
    if lock is None:
        raise RuntimeError(f"another process is preparing {root}; rerun when it finishes")
    try:
        builder = demo_builder()
        if builder is not None:
            t_dir, s_dir = builder(root / "demo", setup.task)
            _link(Path(t_dir), teacher)
            _link(Path(s_dir), student)
        else:
            common = common_overrides(setup, train, test)
            for role, shape, steps, lr, seed in (
                ("teacher", setup.teacher, setup.teacher_sft_steps, setup.teacher_lr, 11),
                ("student", setup.student, setup.student_sft_steps, setup.student_lr, 12),
            ):
                if (root / role / "config.json").exists():
                    continue
                save_tiny_model(root / f"{role}_init", "llama", seed=seed, **vars(shape))
                shutil.rmtree(root / f"{role}_sft", ignore_errors=True)
                _link(_sft(root / f"{role}_init", root / f"{role}_sft", steps, lr, common, seed), root / role)
    finally:
        os.unlink(lock)
    return {"train": train, "test": test, "teacher": teacher, "student": student}


def _claim(path: Path) -> Path | None:
    """Create `path` exclusively (a lock between worker processes); None if someone holds it."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return path


def sft_eval(run_dir: Path) -> dict[str, float]:
    """The final held-out eval of an SFT set-up run (reported next to the comparison)."""
    from rlad_megatron.observe import read_metrics

    rows = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return rows[-1] if rows else {}
