"""What a rehearsal feeds the job instead of the recipe's models and data (`rlad rehearse`).

Models: tiny random ones with the shape of the recipe's models scaled down. The source shape is the model
folder's config.json when it exists, else the built-in table `rlad plan` uses (`capacity.KNOWN_ARCHS`, taken
from the published config.json files on the Hugging Face hub) plus the per-family fields below. The scaled
model keeps the family, the vocabulary size, the GQA ratio and the embedding tying; it gets hidden size 64,
head_dim 16, 2 layers per pipeline stage and a small MLP. Student and teacher share one character tokenizer
(`data.tokenizer.build_char_tokenizer`, with a chat template): it uses the lowest ids of the big vocabulary.

Data: file sources that exist are used as they are; `task:` and `reasoning_gym:` sources generate offline;
a missing file is replaced by a small jsonl of procedural addition problems carrying the fields the recipe's
data config reads (prompt_key, answer_key, metadata_keys, solution_key).

Left out: architectures other than llama / qwen2 / qwen3, scaled rope types (the tiny models use plain
RoPE with the source's theta) and MoE layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlad_megatron.launch.capacity import _table_key, load_arch

# Fields of the published config.json files that KNOWN_ARCHS does not hold, per family of its entries
# (huggingface.co/Qwen/Qwen3-*/config.json: rms_norm_eps 1e-06, rope_theta 1000000;
#  huggingface.co/meta-llama/Meta-Llama-3-*/config.json: rms_norm_eps 1e-05, rope_theta 500000).
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "qwen3": {"model_type": "qwen3", "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0},
    "llama-3": {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500_000.0},
}
FAMILIES = ("llama", "qwen2", "qwen3")
TINY_HIDDEN, TINY_HEAD_DIM, TINY_FFN, LAYERS_PER_STAGE = 64, 16, 128, 2
MAX_POSITIONS = 4096  # the rehearsal's prompts + responses stay far below this


@dataclass(frozen=True)
class SourceModel:
    """The shape a tiny model is scaled from, and where it came from (for the screen)."""

    family: str
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    tie_word_embeddings: bool
    rms_norm_eps: float
    rope_theta: float
    origin: str


def _rope_theta(config: dict) -> float:
    """transformers 5 writes rope_parameters.rope_theta; older files write rope_theta."""
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def source_model(folder: str) -> SourceModel:
    """The recipe's model: its config.json, else the built-in table; else a ValueError saying the fix."""
    path = Path(folder) / "config.json"
    if folder and path.is_file():
        config = json.loads(path.read_text())
        family = config.get("model_type", "")
        heads = config["num_attention_heads"]
        return SourceModel(
            family,
            config["vocab_size"],
            heads,
            config.get("num_key_value_heads", heads),
            bool(config.get("tie_word_embeddings", False)),
            float(config.get("rms_norm_eps", 1e-6)),
            _rope_theta(config),
            str(path),
        )
    key = _table_key(folder)
    extra = next((v for k, v in FAMILY_FIELDS.items() if key.startswith(k)), None)
    if not key or extra is None:
        raise ValueError(
            f"cannot rehearse model {folder!r}: no config.json there and no built-in entry for its "
            f"name; put the model's config.json in {folder} (weights are not needed)"
        )
    arch, origin = load_arch(folder)
    return SourceModel(
        extra["model_type"],
        arch.vocab_size,
        arch.num_attention_heads,
        arch.num_key_value_heads,
        arch.tie_word_embeddings,
        extra["rms_norm_eps"],
        extra["rope_theta"],
        origin,
    )


def tiny_model_fields(src: SourceModel, pipeline: int = 1, tensor: int = 1) -> dict[str, Any]:
    """HF config fields of the scaled-down model (for `testing.save_tiny_model`).

    KV heads: the smallest count >= 2 that the trainer's TP divides; query heads keep the source's GQA ratio.
    Layers: 2 per pipeline stage. Llama / Qwen2 derive head_dim from hidden / heads, so their hidden grows
    with the heads; Qwen3 states head_dim and keeps hidden 64."""
    if src.family not in FAMILIES:
        raise ValueError(f"cannot rehearse model family {src.family!r} ({src.origin}); supported: {list(FAMILIES)}")
    if src.num_attention_heads % src.num_key_value_heads:
        raise ValueError(
            f"{src.origin}: num_attention_heads={src.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={src.num_key_value_heads}"
        )
    kv_heads = max(2, tensor)
    heads = kv_heads * (src.num_attention_heads // src.num_key_value_heads)
    fields = dict(
        vocab_size=src.vocab_size,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=LAYERS_PER_STAGE * pipeline,
        intermediate_size=TINY_FFN,
        tie_word_embeddings=src.tie_word_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_theta=src.rope_theta,
        max_position_embeddings=MAX_POSITIONS,
    )
    if src.family == "qwen3":
        return fields | {"hidden_size": TINY_HIDDEN, "head_dim": TINY_HEAD_DIM}
    return fields | {"hidden_size": heads * TINY_HEAD_DIM}


def build_tiny_model(out: Path, src: SourceModel, seed: int, pipeline: int = 1, tensor: int = 1) -> Path:
    """Write the random tiny model with the char tokenizer into `out`."""
    from rlad_megatron.tiny_models import save_tiny_model

    return save_tiny_model(out, src.family, seed=seed, **tiny_model_fields(src, pipeline, tensor))


def generated_source(source: str) -> bool:
    """`task:` and `reasoning_gym:` sources make their rows offline; the rehearsal uses them as they are."""
    return source.startswith(("task:", "reasoning_gym:"))


def needs_replacement(source: str) -> bool:
    return bool(source) and not generated_source(source) and not Path(source).exists()


def write_addition_rows(path: Path, data_cfg: Any, size: int, split: str, seed: int) -> Path:
    """`size` addition problems as jsonl rows with the recipe's field names."""
    from rlad_megatron.tasks import solution_trace, task_records

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for record in task_records("addition", size=size, seed=seed, split=split):
            row = {
                data_cfg.prompt_key: record["prompt"],
                data_cfg.answer_key: str(record["answer"]),
                data_cfg.solution_key: solution_trace(record),
            }
            for key in data_cfg.metadata_keys:  # the recipe's extra fields: the task's value when it has one
                row[key] = record["metadata"].get(key, "rehearsal")
            out.write(json.dumps(row) + "\n")
    return path
