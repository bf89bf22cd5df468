"""The method comparison's starting point: data, a teacher, and students chosen by a ceiling check.

Built once under `<work>/` and described by small JSON files under `<results>/setup/` (committed):
  train.jsonl / test.jsonl   procedural-task records (hash-held-out split, fixed seed 0), with `task` and
                             `difficulty` kept as metadata (reference traces, per-difficulty eval);
  teacher/                   a wider char-level llama trained by SFT on the reference traces
                             (the project's own `sft` algorithm, train.offline_source=dataset);
                             teacher.json records its held-out avg@k at temperature 1;
  student_init<i>/           for each student initialisation i (its own random weights and SFT seed):
                             SFT in segments of `student_segment_steps`, each followed by a held-out eval
                             at temperature 1, up to `student_ceiling_steps`. RL starts from the first
                             segment whose accuracy reaches `start_accuracy[0]` (weak but learnable); the
                             best accuracy over the segments is the ceiling the student can reach by SFT.
                             student_init<i>.json records every segment, the start and the ceiling.
Every step is resumable: a finished piece is skipped, a student's finished segments are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int = 4
    num_key_value_heads: int = 2


@dataclass(frozen=True)
class Setup:
    """How the data, the teacher and the students are made (sizes live in compare_methods.SIZES)."""

    task: str = "addition"
    difficulties: tuple[int, ...] = (3, 4)
    num_train: int = 4000
    num_test: int = 128
    max_new_tokens: int = 64
    eval_k: int = 4
    teacher: ModelShape = ModelShape(64, 192, 2)
    teacher_sft_steps: int = 2000
    teacher_lr: float = 3e-3
    teacher_min_accuracy: float = 0.9
    student: ModelShape = ModelShape(48, 144, 2)
    student_lr: float = 3e-3
    student_segment_steps: int = 100
    student_ceiling_steps: int = 1500
    start_accuracy: tuple[float, float] = (0.2, 0.4)
    min_ceiling: float = 0.7


def _records(setup: Setup, size: int, split: str) -> list[dict[str, Any]]:
    from rlad_megatron.tasks import solution_trace, task_records

    rows = task_records(setup.task, size, seed=0, split=split, difficulties=list(setup.difficulties))
    # top-level task / difficulty become the record's metadata (data.metadata_keys), so the `dataset`
    # offline source can rebuild each reference trace from a plain jsonl file.
    return [
        dict(r, solution=solution_trace(r), task=r["metadata"]["task"], difficulty=r["metadata"]["difficulty"])
        for r in rows
    ]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def data_files(setup: Setup, work: Path) -> tuple[Path, Path]:
    train, test = work / "train.jsonl", work / "test.jsonl"
    for path, size, split in ((train, setup.num_train, "train"), (test, setup.num_test, "test")):
        if not path.exists():
            write_atomic(path, "".join(json.dumps(r) + "\n" for r in _records(setup, size, split)))
    return train, test


def common_overrides(setup: Setup, train: Path, test: Path) -> list[str]:
    """Data, reward, engines and logging shared by every run (set-up and comparison)."""
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


def sft(init: Path, run_dir: Path, steps: int, lr: float, common: list[str], seed: int, k: int, decay: str):
    """The project's sft algorithm on reference traces, with a held-out eval at temperature 1 at the end.
    Returns (exported HF folder, final eval row)."""
    from rlad_megatron.config import load_config
    from rlad_megatron.conversion.hf_io import resolve_latest
    from rlad_megatron.observe import read_metrics
    from rlad_megatron.train import HF_DIR, train

    shutil.rmtree(run_dir, ignore_errors=True)
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
        f"train.lr_decay_style={decay}",
        f"train.min_lr={lr / 10}",
        "checkpoint.interval=0",
        f"eval.interval={steps}",
        f"eval.num_samples={k}",
        "eval.temperature=1.0",
    ]
    train(load_config(None, overrides), resume=False)
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return Path(resolve_latest(run_dir / HF_DIR)), evals[-1]


def build_teacher(setup: Setup, work: Path, results: Path) -> dict:
    """The teacher folder and teacher.json (held-out avg@k at temperature 1, and whether it meets the bar)."""
    from rlad_megatron.tiny_models import save_tiny_model

    record = results / "teacher.json"
    if record.exists() and (work / "teacher" / "config.json").exists():
        return json.loads(record.read_text())
    train, test = data_files(setup, work)
    save_tiny_model(work / "teacher_init", "llama", seed=11, **vars(setup.teacher))
    folder, row = sft(
        work / "teacher_init",
        work / "teacher_sft",
        setup.teacher_sft_steps,
        setup.teacher_lr,
        common_overrides(setup, train, test),
        seed=11,
        k=setup.eval_k,
        decay="cosine",
    )
    _link(folder, work / "teacher")
    accuracy = float(row[f"eval/avg@{setup.eval_k}"])
    info = {
        "sft_steps": setup.teacher_sft_steps,
        "shape": vars(setup.teacher),
        "avg_at_k_T1": accuracy,
        "by_difficulty_T1": _by_difficulty(row, setup.eval_k),
        "meets_bar": accuracy >= setup.teacher_min_accuracy,
        "bar": setup.teacher_min_accuracy,
    }
    write_atomic(record, json.dumps(info, indent=1))
    return info


def build_student(setup: Setup, init: int, work: Path, results: Path) -> dict:
    """Segmented SFT of student initialisation `init`: its RL start folder and ceiling (module docstring)."""
    from rlad_megatron.tiny_models import save_tiny_model

    name = f"student_init{init}"
    record, root = results / f"{name}.json", work / name
    if record.exists() and (root / "start" / "config.json").exists():
        return json.loads(record.read_text())
    train, test = data_files(setup, work)
    common = common_overrides(setup, train, test)
    progress_path = root / "segments.json"
    segments: list[dict] = json.loads(progress_path.read_text()) if progress_path.exists() else []
    if not (root / "init" / "config.json").exists():
        save_tiny_model(root / "init", "llama", seed=100 + init, **vars(setup.student))
    current = Path(segments[-1]["folder"]) if segments else root / "init"
    while len(segments) * setup.student_segment_steps < setup.student_ceiling_steps:
        index = len(segments)
        folder, row = sft(
            current,
            root / f"segment{index}",
            setup.student_segment_steps,
            setup.student_lr,
            common,
            seed=1000 * init + index,
            k=setup.eval_k,
            decay="constant",
        )
        segments.append(
            {
                "steps": (index + 1) * setup.student_segment_steps,
                "avg_at_k_T1": float(row[f"eval/avg@{setup.eval_k}"]),
                "folder": str(folder),
            }
        )
        write_atomic(progress_path, json.dumps(segments))
        current = folder
    start = choose_start(segments, setup.start_accuracy[0])
    _link(Path(start["folder"]), root / "start")
    ceiling = max(s["avg_at_k_T1"] for s in segments)
    info = {
        "init": init,
        "shape": vars(setup.student),
        "segments": [{k: v for k, v in s.items() if k != "folder"} for s in segments],
        "start_steps": start["steps"],
        "start_avg_at_k_T1": start["avg_at_k_T1"],
        "start_in_band": setup.start_accuracy[0] <= start["avg_at_k_T1"] <= setup.start_accuracy[1],
        "start_band": list(setup.start_accuracy),
        "ceiling_avg_at_k_T1": ceiling,
        "ceiling_ok": ceiling >= setup.min_ceiling,
        "min_ceiling": setup.min_ceiling,
    }
    write_atomic(record, json.dumps(info, indent=1))
    return info


def choose_start(segments: Sequence[dict], low: float) -> dict:
    """The first segment whose held-out accuracy reaches `low`; the last segment if none does."""
    for segment in segments:
        if segment["avg_at_k_T1"] >= low:
            return segment
    return segments[-1]


def _by_difficulty(row: dict, k: int) -> dict[str, float]:
    prefix, suffix = "eval/difficulty=", f"/avg@{k}"
    return {
        key[len(prefix) : -len(suffix)]: v for key, v in row.items() if key.startswith(prefix) and key.endswith(suffix)
    }


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    # relative, so a prepared folder can be moved or copied whole
    tmp.symlink_to(os.path.relpath(src.resolve(), dst.parent.resolve()), target_is_directory=True)
    tmp.replace(dst)
    return dst
