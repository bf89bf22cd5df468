"""`rlad eval` end to end with the real embedded engine on a tiny random model, HF folder and Megatron checkpoint."""

import json

import pytest

from rlad_megatron.cli import main
from rlad_megatron.tiny_models import save_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "hf", "llama", seed=3)


def run_eval(model, out, *extra):
    code = main(
        [
            "eval",
            "--model",
            str(model),
            "--data",
            "task:addition",
            "--k",
            "2",
            "--max-new-tokens",
            "6",
            "--set",
            "data.task_kwargs={size: 5}",
            "--set",
            "rollout.kind=embedded",
            "--seed",
            "7",
            "--out",
            str(out),
            *extra,
        ]
    )
    assert code == 0
    return json.loads((out / "eval.json").read_text())


def test_embedded_engine_report_is_consistent_and_seeded(tiny_model, tmp_path):
    first = run_eval(tiny_model, tmp_path / "a", "--temperature", "1.0")
    again = run_eval(tiny_model, tmp_path / "b", "--temperature", "1.0")
    overall = first["overall"]
    assert overall["num_prompts"] == 5 and sum(first["finish_reasons"].values()) == 10
    assert 0 < overall["mean_response_length"] <= 6
    assert 0.0 <= overall["avg@2"] <= overall["pass@2"] <= 1.0
    assert first["examples"] == again["examples"]  # same seed, same samples


def test_megatron_checkpoint_is_exported_then_evaluated_like_the_hf_folder(tiny_model, tmp_path):
    from rlad_megatron.conversion.convert import hf_to_megatron

    ckpt = hf_to_megatron(tiny_model, tmp_path / "ckpt")
    from_hf = run_eval(tiny_model, tmp_path / "hf_eval", "--temperature", "0")
    from_ckpt = run_eval(ckpt, tmp_path / "ckpt_eval", "--temperature", "0")
    assert (tmp_path / "ckpt_eval" / "hf_model" / "config.json").exists()
    assert from_ckpt["examples"] == from_hf["examples"] and from_ckpt["overall"] == from_hf["overall"]
