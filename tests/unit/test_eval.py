"""Evaluation: unbiased pass@k vs brute-force enumeration, evaluate() with a scripted engine, reports, `rlad eval`."""

import itertools
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

import pytest

from rlad_megatron.config import DataConfig
from rlad_megatron.data import load_prompts
from rlad_megatron.data.tokenizer import build_char_tokenizer
from rlad_megatron.eval import evaluate, markdown_table, pass_at_k, write_report
from rlad_megatron.eval.metrics import by_metadata, flatten
from rlad_megatron.rewards import get_reward_fn
from rlad_megatron.tasks import solution_trace


def brute_force_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n_and_checks_arguments():
    value = pass_at_k(2000, 3, 100)
    exact = 1 - math.comb(1997, 100) / math.comb(2000, 100)
    assert value == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(100, 0, 10) == 0.0 and pass_at_k(100, 95, 10) == 1.0
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(*bad)


@dataclass
class Out:
    response_ids: list
    logprobs: list
    finish_reason: str


class ScriptedEngine:
    """Sample s of prompt i is the correct trace when s < num_correct(i), else a wrong answer."""

    def __init__(self, tok, num_correct):
        self.tok, self.num_correct, self.calls = tok, num_correct, []

    def generate(self, prompt_ids, sampling, n=1):
        self.calls.append((len(prompt_ids), sampling, n))
        results = []
        for ids in prompt_ids:
            prompt = self.tok.decode(ids, skip_special_tokens=True)
            rec = {"prompt": prompt, "metadata": {"task": "addition"}}
            good = solution_trace(rec)
            c = self.num_correct(prompt)
            texts = [good if s < c else good.split("#")[0] + "#99999" for s in range(n)]
            results.append(
                [
                    Out(
                        self.tok(t, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id],
                        [-0.1] * (len(t) + 1),
                        "stop",
                    )
                    for t in texts
                ]
            )
        return results


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def num_correct_of(prompt):
    return sum(map(int, prompt.rstrip("=").split("+"))) % 5


def test_evaluate_reports_avg_pass_length_and_breakdown(tok):
    records = load_prompts(
        "task:addition", DataConfig(task_kwargs={"size": 12, "difficulties": [1, 2, 3]}), tok, split="test"
    )
    k = 4
    engine = ScriptedEngine(tok, num_correct_of)
    result = evaluate(
        engine, tok, records, get_reward_fn("task:addition"), k=k, sampling="S", batch_size=5, keep_samples=3
    )
    assert [c[0] for c in engine.calls] == [5, 5, 2] and all(c[1:] == ("S", k) for c in engine.calls)
    counts = [min(num_correct_of(r["record"]["prompt"]), k) for r in records]
    overall = result["overall"]
    assert overall["num_prompts"] == 12
    assert overall["avg@4"] == pytest.approx(sum(counts) / (4 * 12))
    for j in (1, 2, 4):
        assert overall[f"pass@{j}"] == pytest.approx(sum(float(brute_force_pass_at_k(4, c, j)) for c in counts) / 12)
    lengths = [len(engine.generate([r["prompt_ids"]], None, n=k)[0][s].response_ids) for r in records for s in range(k)]
    assert overall["mean_response_length"] == pytest.approx(sum(lengths) / len(lengths))
    by_level = result["breakdown"]["difficulty"]
    assert list(by_level) == ["1", "2", "3"] and sum(v["num_prompts"] for v in by_level.values()) == 12
    level1 = [c for r, c in zip(records, counts) if r["record"]["metadata"]["difficulty"] == 1]
    assert by_level["1"]["avg@4"] == pytest.approx(sum(level1) / (4 * len(level1)))
    assert result["finish_reasons"] == {"stop": 48} and len(result["examples"]) == 3
    assert [p["num_correct"] for p in result["per_prompt"]] == counts


def test_breakdown_expands_nested_metadata():
    prompts = [
        {
            "metadata": {"difficulty": {"n_people": n, "depth": 2}, "source_index": i},
            "num_correct": c,
            "rewards": [0.0] * 2,
            "lengths": [3, 5],
        }
        for i, (n, c) in enumerate([(2, 2), (3, 0), (2, 1), (10, 2)])
    ]
    table = by_metadata(prompts, ["difficulty"], 2)
    assert set(table) == {"difficulty.n_people", "difficulty.depth"}
    assert list(table["difficulty.n_people"]) == ["2", "3", "10"]
    assert table["difficulty.n_people"]["2"]["avg@2"] == 0.75 and table["difficulty.depth"]["2"]["num_prompts"] == 4
    assert flatten({"a": {"b": [1]}, "c": None}) == {"c": None}


def test_report_files_and_engine_contract_errors(tmp_path, tok):
    records = load_prompts("task:addition", DataConfig(task_kwargs={"size": 3}), tok)
    result = evaluate(
        ScriptedEngine(tok, lambda p: 1), tok, records, get_reward_fn("task:addition"), k=2, sampling=None
    )
    paths = write_report(result, tmp_path / "out", "addition")
    assert json.loads(paths["json"].read_text())["overall"]["avg@2"] == 0.5
    md = paths["markdown"].read_text()
    assert "| all | 3 | 0.500 | 0.500 | 1.000 |" in md and md.endswith(markdown_table(result))

    class ShortEngine(ScriptedEngine):
        def generate(self, prompt_ids, sampling, n=1):
            return super().generate(prompt_ids, sampling, n)[:-1]

    with pytest.raises(RuntimeError, match="engine returned"):
        evaluate(ShortEngine(tok, lambda p: 1), tok, records, get_reward_fn("task:addition"), k=2, sampling=None)
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate(ShortEngine(tok, lambda p: 1), tok, [], get_reward_fn("task:addition"), k=2, sampling=None)


def test_rlad_eval_command_with_a_scripted_engine(tmp_path, tok, monkeypatch, capsys):
    from rlad_megatron import engines
    from rlad_megatron.cli import main

    model = tmp_path / "model"
    tok.save_pretrained(str(model))
    (model / "config.json").write_text("{}")
    built = []

    def fake_build_engine(engine_cfg, model_dir, role):
        built.append((model_dir, role))
        return ScriptedEngine(tok, num_correct_of)

    monkeypatch.setattr(engines, "build_engine", fake_build_engine, raising=False)
    monkeypatch.setattr(engines, "SamplingParams", lambda **kw: SimpleNamespace(**kw), raising=False)
    out = tmp_path / "report"
    code = main(
        [
            "eval",
            "--model",
            str(model),
            "--data",
            "task:addition",
            "--k",
            "3",
            "--temperature",
            "0",
            "--set",
            "data.task_kwargs={size: 6}",
            "--out",
            str(out),
        ]
    )
    assert code == 0 and built == [(str(model), "rollout")]
    report = json.loads((out / "eval.json").read_text())
    assert report["reward"] == "task:addition" and report["split"] == "test" and report["overall"]["num_prompts"] == 6
    assert (out / "eval.md").read_text().startswith("# eval")
    with pytest.raises(SystemExit, match="neither a Hugging Face folder"):
        main(["eval", "--model", str(tmp_path), "--data", "task:addition"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": 3, "answer": "1"}\n')
    assert (
        main(["eval", "--model", str(model), "--data", str(bad), "--reward", "task:addition", "--out", str(out)]) == 2
    )
    assert f"{bad}:2: field 'prompt'" in capsys.readouterr().err


def test_knights_knaves_breakdown_by_number_of_people(tok):
    cfg = DataConfig(
        template="none",
        max_prompt_length=4000,
        task_kwargs={"size": 6, "configs": [{"n_people": 2}, {"n_people": 3}, {"n_people": 4}]},
    )
    records = load_prompts("reasoning_gym:knights_knaves", cfg, tok, split="test")
    assert [r["record"]["metadata"]["difficulty"]["n_people"] for r in records] == [2, 3, 4, 2, 3, 4]

    class AnswerEngine:  # answers right exactly for the 2-person puzzles
        def generate(self, prompt_ids, sampling, n=1):
            out = []
            for ids in prompt_ids:
                rec = next(r["record"] for r in records if r["prompt_ids"] == ids)
                text = rec["answer"] if rec["metadata"]["difficulty"]["n_people"] == 2 else "no idea"
                out.append(
                    [Out(tok(f"<answer>{text}</answer>", add_special_tokens=False)["input_ids"], [], "stop")] * n
                )
            return out

    result = evaluate(AnswerEngine(), tok, records, get_reward_fn("reasoning_gym:knights_knaves"), k=2, sampling=None)
    people = result["breakdown"]["difficulty.n_people"]
    assert {v: m["avg@2"] for v, m in people.items()} == {"2": 1.0, "3": 0.0, "4": 0.0}
    assert result["overall"]["pass@2"] == pytest.approx(1 / 3)
