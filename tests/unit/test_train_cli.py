"""`rlad train --dry-run`: one clear message per problem, exit 1; the example recipes validate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rlad_megatron.train_cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rlad_megatron.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    tiny = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    save_tiny_model(root / "student", "llama", seed=1, **tiny)
    save_tiny_model(root / "teacher", "llama", seed=2, **tiny)
    return root


def _recipe(tmp_path, models, **extra) -> str:
    lines = {
        "run_dir": str(tmp_path / "run"),
        "model.student": str(models / "student"),
        "model.teacher": str(models / "teacher"),
        "algorithm.name": "rlad",
        "data.train": "task:addition",
        "data.task_kwargs.size": "8",
        "rollout.kind": "embedded",
        "teacher.kind": "embedded",
    }
    lines.update(extra)
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in {"run_dir": lines.pop("run_dir")}.items()))
    return [f"--config={path}"] + [f"{k}={v}" for k, v in lines.items()]


def _dry(capsys, args):
    code = main(args + ["--dry-run"])
    out = capsys.readouterr()
    problems = [line.strip()[2:] for line in out.err.splitlines() if line.strip().startswith("- ")]
    return code, out.out, problems


def test_valid_setup_passes_and_prints_the_plan(tmp_path, models, capsys):
    code, out, problems = _dry(capsys, _recipe(tmp_path, models))
    assert (code, problems) == (0, [])
    assert "8 x 32 prompts" not in out and "100 x 32 prompts x 8 responses = 256 samples/step" in out
    assert "resume           no checkpoint yet: starts at step 0" in out and "dry run: OK" in out


def test_missing_model_folder(tmp_path, models, capsys):
    code, _, problems = _dry(capsys, _recipe(tmp_path, models, **{"model.teacher": str(tmp_path / "nope")}))
    assert code == 1 and len(problems) == 1
    assert problems[0].startswith(f"model.teacher='{tmp_path / 'nope'}' is not a folder on this machine")


def test_missing_weight_shard_is_named(tmp_path, models, capsys):
    broken = tmp_path / "sharded"
    shutil.copytree(models / "student", broken)
    (broken / "model.safetensors").rename(broken / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, problems = _dry(capsys, _recipe(tmp_path, models, **{"model.student": str(broken)}))
    assert code == 1 and len(problems) == 1
    assert "is missing model-00002-of-00002.safetensors" in problems[0]


def test_tokenizer_mismatch(tmp_path, models, capsys):
    from rlad_megatron.tiny_models import save_tiny_model

    other = tmp_path / "other_teacher"
    save_tiny_model(
        other,
        "llama",
        seed=3,
        tokenizer=False,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=120,
    )
    from rlad_megatron.data.tokenizer import build_char_tokenizer

    build_char_tokenizer(other, alphabet="0123456789+=# abcdefghijklmnop")  # a different vocabulary
    code, _, problems = _dry(capsys, _recipe(tmp_path, models, **{"model.teacher": str(other)}))
    assert code == 1 and len(problems) == 1
    assert "tokenizer" in problems[0].lower()


def test_bad_dataset_rows(tmp_path, models, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "", "answer": "3"}\n{"question": "x"}\n')
    code, _, problems = _dry(capsys, _recipe(tmp_path, models, **{"data.train": str(data), "reward.name": "math"}))
    assert code == 1 and len(problems) == 1
    assert problems[0].startswith(f"data.train='{data}': 2 bad rows of 3")


def test_impossible_parallel_layout(tmp_path, models, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # as under torchrun --nproc_per_node 3
    code, _, problems = _dry(capsys, _recipe(tmp_path, models, **{"parallel.tensor_model_parallel_size": "3"}))
    assert code == 1 and len(problems) == 1
    assert problems[0].startswith("parallel.tensor_model_parallel_size=3 must divide the student's attention heads (4)")


def test_unknown_config_key_is_refused(tmp_path, models, capsys):
    assert main(_recipe(tmp_path, models, **{"train.num_stepz": "3"}) + ["--dry-run"]) == 2
    assert "unknown config key 'train.num_stepz'" in capsys.readouterr().err


@pytest.mark.parametrize("example", ["qwen3_kk", "qwen3_math"])
def test_cluster_recipes_validate_and_name_the_missing_models(example, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, out, problems = _dry(capsys, [f"--config={REPO / 'examples' / example / 'recipe.yaml'}"])
    assert code == 1 and "algorithm        rlad (group_size=8, clip=0.2/0.28, alpha=0.5)" in out
    # Config, parallel layout and launch topology are valid: the only problems are absent files.
    assert problems and all(p.startswith(("model.", "data.")) for p in problems), problems
    assert any("is not a folder on this machine; it needs config.json" in p for p in problems)
