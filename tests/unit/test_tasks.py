"""Procedural tasks: seeded determinism, disjoint held-out split, traces scored right, tokenizer coverage."""

import random

import pytest

from rlad_megatron.data.tokenizer import build_char_tokenizer
from rlad_megatron.rewards import get_reward_fn
from rlad_megatron.tasks import TASKS, get_task, solution_trace, split_of, task_records
from rlad_megatron.tasks.arithmetic import parse_final_answer
from rlad_megatron.tasks.reasoning_gym_tasks import reasoning_gym_records

NAMES = sorted(TASKS)


@pytest.mark.parametrize("name", NAMES)
def test_seeded_generation_is_deterministic(name):
    a = task_records(name, 50, seed=7, difficulties=[1, 2, 3])
    assert a == task_records(name, 50, seed=7, difficulties=[1, 2, 3])
    assert a != task_records(name, 50, seed=8, difficulties=[1, 2, 3])
    assert [r["metadata"]["difficulty"] for r in a[:6]] == [1, 2, 3, 1, 2, 3]


@pytest.mark.parametrize("name", NAMES)
def test_heldout_never_overlaps_training(name):
    train = {
        r["prompt"] for seed in range(3) for r in task_records(name, 300, seed=seed, split="train", difficulties=[1, 2])
    }
    test = {
        r["prompt"] for seed in range(3) for r in task_records(name, 100, seed=seed, split="test", difficulties=[1, 2])
    }
    assert train and test and not train & test
    assert all(split_of(f"{name}:{p}", 0.1) == "test" for p in test)


def test_reasoning_gym_heldout_never_overlaps_training():
    train = {r["prompt"] for r in reasoning_gym_records("basic_arithmetic", 40, seed=1, split="train")}
    test = {r["prompt"] for r in reasoning_gym_records("basic_arithmetic", 10, seed=2, split="test")}
    assert len(test) == 10 and not train & test


def _reference(prompt: str) -> str:
    op = "+" if "+" in prompt else "*"
    a, b = (int(x) for x in prompt.rstrip("=").split(op))
    return str(a + b if op == "+" else a * b)


@pytest.mark.parametrize("name", NAMES)
def test_traces_score_correct_with_the_task_reward(name):
    reward = get_reward_fn(f"task:{name}", format_weight=0.25)
    for rec in task_records(name, 200, seed=3, difficulties=[1, 2, 3, 4, 5]):
        trace = solution_trace(rec)
        assert parse_final_answer(trace) == rec["answer"] == _reference(rec["prompt"])
        result = reward(trace, rec)
        assert result.correct and result.details["format_ok"] and result.score == 1.25
        assert not reward(trace.replace(f"#{rec['answer']}", f"#{int(rec['answer']) + 1}"), rec).correct


def test_addition_trace_is_column_by_column_with_carries():
    rec = {"prompt": "47+85=", "answer": "132", "metadata": {"task": "addition", "difficulty": 2}}
    assert solution_trace(rec) == "7+5=12 4+8+1=13 #132"
    rec = {"prompt": "47*6=", "answer": "282", "metadata": {"task": "multiplication", "difficulty": 2}}
    assert solution_trace(rec) == "7*6=42 4*6+4=28 #282"


@pytest.mark.parametrize("name", NAMES)
def test_easy_levels_have_short_traces(name):
    for rec in task_records(name, 200, seed=0, difficulties=[1, 2, 3]):
        assert len(solution_trace(rec)) < 60 and len(rec["prompt"]) <= 8


def test_reward_scores_without_format_term_and_bad_responses():
    reward = get_reward_fn("task:addition")
    rec = {"prompt": "2+2=", "answer": "4", "metadata": {"task": "addition"}}
    assert reward("#4", rec).score == 1.0
    assert reward("2+2=4 #04", rec).score == 1.0
    for bad in ["", "4", "#", "# five", "#5"]:
        assert reward(bad, rec).score == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_char_tokenizer_covers_every_character(name):
    tok = build_char_tokenizer()
    vocab = tok.get_vocab()
    task = get_task(name)
    assert all(c in vocab for c in task.alphabet)
    text = "".join(r["prompt"] + solution_trace(r) for r in task_records(name, 300, seed=1, difficulties=[1, 2, 3, 4]))
    assert set(text) <= set(task.alphabet)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == text


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("subtraction")
    with pytest.raises(ValueError, match="split"):
        task_records("addition", 3, split="validation")
    with pytest.raises(ValueError, match="difficulty"):
        task_records("addition", 3, difficulties=[0])
    assert get_task("addition").draw(random.Random(0), 1)["metadata"] == {"task": "addition", "difficulty": 1}
