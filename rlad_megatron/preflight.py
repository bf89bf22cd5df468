"""Checks run by `rlad train --dry-run` (and before every run): fail in seconds, not minutes in.

`preflight(cfg) -> (problems, objective)`: each problem is one sentence naming what is wrong
and how to fix it. Checked, without building any model:
  - model folders: present, with config.json, tokenizer files and every weight shard
    (a sharded checkpoint's index lists its shards; each missing one is named),
  - student and teacher tokenizers map the same tokens to the same ids (each teacher's, with `teachers:`),
  - model architecture: every config field that changes the maths (RoPE variant and parameters,
    biases, sliding windows, activation, ...) is one the trainer and the embedded engine compute
    exactly like transformers (`conversion.arch.check_supported`, docs/conversion.md); checked for
    the student, the reference and an embedded-engine teacher,
  - dataset rows: the data package's loader validates every row (fields, UTF-8, prompt length),
  - parallel layout: TP divides attention and KV heads, PP divides layers, TP x PP divides the
    trainer's GPUs (WORLD_SIZE under torchrun, else launch.* nodes x gpus_per_node).
When a model folder is absent (cluster recipes checked on a laptop), the architecture for the
layout check comes from `KNOWN_ARCHITECTURES` by folder name.
Left out: network reachability of http engines, GPU memory (that is `rlad plan`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlad_megatron.config import RunConfig, teachers_of

# (attention heads, KV heads, layers) of the models the example recipes name, from their config.json.
KNOWN_ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "Qwen3-0.6B": (16, 8, 28),
    "Qwen3-1.7B": (16, 8, 28),
    "Qwen3-4B": (32, 8, 36),
    "Qwen3-8B": (32, 8, 36),
    "Qwen3-14B": (40, 8, 40),
    "Qwen3-32B": (64, 8, 64),
}
KNOWN_ARCHITECTURES.update(
    {f"{name}-Base": arch for name, arch in list(KNOWN_ARCHITECTURES.items()) if name != "Qwen3-32B"}
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _download_hint(path: str) -> str:
    name = Path(path).name
    repo = f"Qwen/{name}" if name.startswith("Qwen") else f"<org>/{name}"
    return f"download it first, e.g. `hf download {repo} --local-dir {path}`"


def model_folder_problems(role: str, path: str, key: str = "") -> list[str]:
    """Problems with one HF model folder (empty list when it looks complete). `key`: the config key that
    names it (default model.<role>)."""
    key = key or f"model.{role}"
    needed = "config.json, tokenizer.json + tokenizer_config.json, model.safetensors (or an index and its shards)"
    if not path:
        return [f"{key} is empty: set it to a Hugging Face model folder ({needed})"]
    folder = Path(path)
    if not folder.is_dir():
        return [f"{key}={path!r} is not a folder on this machine; it needs {needed}; {_download_hint(path)}"]
    missing = [name for name in ("config.json",) + TOKENIZER_FILES if not (folder / name).exists()]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing += [shard for shard in shards if not (folder / shard).exists()]
    elif not (folder / "model.safetensors").exists() and not (folder / "pytorch_model.bin").exists():
        missing.append("model.safetensors")
    if missing:
        return [f"{key}={path!r} is missing {', '.join(missing)}; {_download_hint(path)}"]
    return []


def tokenizer_problems(student: str, teacher: str, label: str = "") -> list[str]:
    """Student and teacher must share the vocabulary (docs/algorithms.md section 6; teacher package check).
    `label` ('teachers.<name>') prefixes the message when the run has several teachers."""
    from rlad_megatron.teacher import check_same_tokenizer

    try:
        check_same_tokenizer(student, teacher)
    except ValueError as err:
        return [f"{label}: {err}" if label else str(err)]
    return []


def architecture_problems(role: str, path: str, key: str = "") -> list[str]:
    """The config field of this model folder that the trainer / embedded engine would refuse, if any."""
    from rlad_megatron.conversion.arch import UnsupportedModelError, arch_from_config

    if not (Path(path) / "config.json").exists():
        return []
    try:
        arch_from_config(path)
    except UnsupportedModelError as err:
        return [f"{key or f'model.{role}'}={path!r}: {err}"]
    return []


def model_folders(cfg: RunConfig, roles: list[str]) -> list[tuple[str, str, str]]:
    """(role, config key, folder) of each model the run loads; the 'teacher' role is every teacher."""
    from rlad_megatron.config import teachers_of

    out = []
    for role in roles:
        if role != "teacher":
            out.append((role, f"model.{role}", getattr(cfg.model, role)))
            continue
        for t in teachers_of(cfg):
            out.append((role, "model.teacher" if t.section == "teacher" else f"{t.section}.model", t.model))
    return out


def _checked_architectures(cfg: RunConfig, roles: list[str]) -> list[tuple[str, str, str]]:
    """Models that run in the trainer (student, reference) or in the embedded engine (a teacher)."""
    from rlad_megatron.config import teacher_by_section
    from rlad_megatron.engines.factory import resolve_kind

    def embedded(key: str) -> bool:  # key: model.teacher or teachers.<name>.model
        section = "teacher" if key == "model.teacher" else key.removesuffix(".model")
        return resolve_kind(teacher_by_section(cfg, section).engine) == "embedded"

    return [(role, key, path) for role, key, path in model_folders(cfg, roles) if role != "teacher" or embedded(key)]


def _architecture(path: str) -> tuple[int, int, int] | None:
    config = Path(path) / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        heads = int(data["num_attention_heads"])
        return heads, int(data.get("num_key_value_heads") or heads), int(data["num_hidden_layers"])
    return KNOWN_ARCHITECTURES.get(Path(path).name)


def trainer_gpus(cfg: RunConfig) -> int:
    """Processes the trainer runs on: WORLD_SIZE under torchrun, else the GPUs `rlad render`'s
    topology gives the trainer (launch.*); 1 when the topology itself is invalid (reported apart)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if getattr(cfg, "launch", None) is None:
        return 1
    from rlad_megatron.launch.topology import plan_topology

    try:
        topo = plan_topology(cfg)
    except ValueError:
        return 1
    return len(topo.trainer_nodes) * len(topo.trainer_gpus)


def layout_problems(cfg: RunConfig) -> list[str]:
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    problems = []
    arch = _architecture(cfg.model.student)
    if arch is not None:
        heads, kv_heads, layers = arch
        if heads % tp or kv_heads % tp:
            problems.append(
                f"parallel.tensor_model_parallel_size={tp} must divide the student's attention heads "
                f"({heads}) and KV heads ({kv_heads}); choose a TP size dividing both"
            )
        if layers % pp:
            problems.append(f"parallel.pipeline_model_parallel_size={pp} must divide the student's {layers} layers")
    gpus = trainer_gpus(cfg)
    if gpus % (tp * pp * p.context_parallel_size):
        problems.append(
            f"the trainer has {gpus} process(es), not a multiple of TP({tp}) x PP({pp}) x "
            f"CP({p.context_parallel_size}); change parallel.* or the number of trainer GPUs"
        )
    return problems


def data_file_problems(cfg: RunConfig) -> list[str]:
    """Dataset files that do not exist (checked even when no tokenizer is available)."""
    problems = []
    for name in ("train", "eval"):
        source = getattr(cfg.data, name)
        if source and not source.startswith(("task:", "reasoning_gym:")) and not Path(source).exists():
            problems.append(
                f"data.{name}={source!r} does not exist; give a .jsonl / .parquet file, a datasets folder, "
                "task:<name> or reasoning_gym:<task>"
            )
    return problems


def topology_problems(cfg: RunConfig) -> list[str]:
    """The node roles `rlad render` would lay out for launch.* (skipped under torchrun)."""
    if "WORLD_SIZE" in os.environ or getattr(cfg, "launch", None) is None:
        return []
    from rlad_megatron.launch.topology import plan_topology

    try:
        plan_topology(cfg)
    except ValueError as err:
        return [f"launch: {err}"]
    return []


def data_problems(cfg: RunConfig) -> list[str]:
    """Let the data package load and validate every row (it names file, row and field). Needs the
    student's tokenizer (prompt length is counted in tokens), so it runs only when the folder exists."""
    from transformers import AutoTokenizer

    from rlad_megatron.data.loader import load_prompts

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.student)
    problems = []
    for name, split in (("train", "train"), ("eval", "test")):
        source = getattr(cfg.data, name)
        if source:
            try:
                teachers = list(cfg.teachers) if name == "train" else []  # rows routed to unknown teachers
                load_prompts(source, cfg.data, tokenizer, split=split, seed=cfg.seed, teachers=teachers)
            except (ValueError, FileNotFoundError) as err:
                problems.append(f"data.{name}={source!r}: {err}")
    return problems


def logging_problems(cfg: RunConfig) -> list[str]:
    """logging.wandb.project needs the wandb package (the `launch` extra)."""
    if not cfg.logging.wandb.project:
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        return [
            f"logging.wandb.project={cfg.logging.wandb.project!r} needs wandb: pip install -e '.[launch]' "
            "(or leave logging.wandb.project empty)"
        ]
    return []


def required_models(cfg: RunConfig, objective) -> list[str]:
    """Model roles this run loads: the student always; the teacher when the objective or the
    sample source needs it (see train.sample_source)."""
    from rlad_megatron.components import wants_teacher_engine
    from rlad_megatron.train import sample_source

    roles = ["student"]
    if wants_teacher_engine(objective, sample_source(cfg)):
        roles.append("teacher")
    if cfg.model.reference and objective.needs_ref:
        roles.append("reference")
    return roles


def preflight(cfg: RunConfig):
    """(problems, objective): everything a run would trip over, as one message per problem."""
    from rlad_megatron.algorithms.objectives import build_objective

    objective = build_objective(cfg.algorithm)
    problems: list[str] = []
    roles = required_models(cfg, objective)
    for role, key, path in model_folders(cfg, roles):
        problems += model_folder_problems(role, path, key)
    if not problems:
        for role, key, path in _checked_architectures(cfg, roles):
            problems += architecture_problems(role, path, key)
    folders_ok = not problems  # the tokenizer and data checks load the folders with transformers
    if folders_ok and "teacher" in roles:
        for teacher in teachers_of(cfg):  # each teacher scores the student's ids: each must share its vocabulary
            label = teacher.section if cfg.teachers else ""
            problems += tokenizer_problems(cfg.model.student, teacher.model, label)
    if cfg.train.mode == "train_only" and not Path(cfg.train.rollout_dir or "-").is_dir():
        problems.append(
            f"train.mode=train_only needs train.rollout_dir to be a folder of saved rollouts "
            f"(got {cfg.train.rollout_dir!r}); write one with train.mode=rollout_only"
        )
    file_problems = data_file_problems(cfg)
    problems += file_problems
    if folders_ok and not file_problems:
        problems += data_problems(cfg)
    problems += layout_problems(cfg) + topology_problems(cfg) + logging_problems(cfg)
    return problems, objective
