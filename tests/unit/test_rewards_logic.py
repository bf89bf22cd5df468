"""Knights-and-Knaves (Logic-RL scores), reasoning-gym rewards vs reasoning-gym's scorer, registry, batch scoring."""

import pytest

from rlad_megatron.rewards import get_reward_fn, resolve_reward_name, score_samples
from rlad_megatron.rewards.knights_knaves import (
    KnightsKnavesReward,
    gold_roles,
    parse_roles,
    split_format,
)
from rlad_megatron.rewards.reasoning_gym import extract_rg_answer
from rlad_megatron.tasks.reasoning_gym_tasks import entry_for, json_safe, reasoning_gym_records
from rlad_megatron.types import Sample

GOLD = {"answer": "Zoey is a knight, and Oliver is a knave."}


def wrap(answer: str, think: str = "Zoey says ... so") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize(
    "response,score,status",
    [
        (wrap("(1) Zoey is a knight\n(2) Oliver is a knave"), 3.0, "correct"),
        (wrap("Oliver is a knave, and Zoey is a knight."), 3.0, "correct"),
        (wrap("Zoey is a Knight and Oliver is a KNAVE"), 3.0, "correct"),
        (wrap("Zoey is a knave, and Oliver is a knave."), -0.5, "wrong"),
        (wrap("Zoey is a knight, Oliver is a knight; no wait, Oliver is a knave"), 3.0, "correct"),
        (wrap("Zoey is a knight."), -1.0, "unparseable"),
        (wrap("Zoey: knight, Oliver: knave"), -1.0, "unparseable"),
        ("Zoey is a knight, and Oliver is a knave.", -1.0, "format"),
        ("<answer>Zoey is a knight, Oliver is a knave</answer>", -1.0, "format"),
        ("<think>a</think><answer>x</answer><answer>Zoey is a knight, Oliver is a knave</answer>", -1.0, "format"),
        ("<answer>Zoey is a knight</answer><think>late</think>", -1.0, "format"),
        ("", -1.0, "format"),
    ],
)
def test_logic_rl_scores(response, score, status):
    result = KnightsKnavesReward()(response, GOLD)
    assert result.score == pytest.approx(score)
    assert result.details["status"] == status
    assert result.correct == (status == "correct")


def test_scores_are_configurable_and_think_optional():
    fn = KnightsKnavesReward(format_correct=0.5, answer_correct=1.0, answer_wrong=0.0, require_think=False)
    assert fn("<answer>Zoey is a knight, Oliver is a knave</answer>", GOLD).score == 1.5
    assert fn("<answer>Zoey is a knave, Oliver is a knave</answer>", GOLD).score == 0.5
    assert fn("<think>x</think><answer>Zoey is a knight, Oliver is a knave</answer>", GOLD).score == 1.5


def test_parsing_helpers():
    assert parse_roles("Amelia is a hero, and Elizabeth is an villain.") == {"Amelia": "hero", "Elizabeth": "villain"}
    assert gold_roles({"Ann": "Knight"}) == {"Ann": "knight"}
    with pytest.raises(ValueError, match="Knights-and-Knaves solution"):
        gold_roles("no roles here")
    assert split_format("<think>t</think> <answer> a </answer> ") == " a "
    assert split_format("<think>t</think>") is None


def test_reasoning_gym_knights_knaves_through_logic_rl_reward():
    records = reasoning_gym_records("knights_knaves", 4, seed=3, split="train")
    fn = get_reward_fn("knights_knaves")
    for rec in records:
        assert fn(wrap(rec["answer"]), rec).correct


@pytest.mark.parametrize("task", ["knights_knaves", "basic_arithmetic", "countdown", "chain_sum"])
def test_reasoning_gym_reward_equals_its_own_score_answer(task):
    records = reasoning_gym_records(task, 5, seed=11, split="train")
    fn = get_reward_fn(f"reasoning_gym:{task}")
    for rec in records:
        entry = entry_for(rec)
        # The regenerated entry is the prompt's own (same question and answer), not merely one of the task's.
        assert entry["question"] == rec["prompt"] and json_safe(entry["answer"]) == rec["answer"]
        from rlad_megatron.tasks.reasoning_gym_tasks import dataset_for

        dataset = dataset_for(rec["metadata"]["reasoning_gym"])
        for answer in [str(entry["answer"]), "1", "Zoey is a knave", ""]:
            response = f"<think>hmm</think><answer>{answer}</answer>"
            assert fn(response, rec).score == float(dataset.score_answer(answer or None, entry))
        assert fn(f"<answer>{entry['answer']}</answer>", rec).correct


def test_reasoning_gym_final_line_fallback_and_file_records():
    assert extract_rg_answer("thinking\n  42  \n\n") == "42"
    assert extract_rg_answer("x <answer> 7 </answer> y\nz") == "7"
    rec = reasoning_gym_records("basic_arithmetic", 1, seed=0)[0]
    file_record = {"prompt": rec["prompt"], "answer": rec["answer"], "metadata": {}}
    fn = get_reward_fn("reasoning_gym:basic_arithmetic")
    assert fn(f"work\n{rec['answer']}", file_record).score == 1.0
    assert fn("work\n-123456789", file_record).score == 0.0


def test_registry_resolution_and_errors():
    assert resolve_reward_name("auto", "task:addition") == "task:addition"
    assert resolve_reward_name("math", "x.jsonl") == "math"
    with pytest.raises(ValueError, match="set reward.name"):
        resolve_reward_name("auto", "data/train.jsonl")
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="unknown task"):
        get_reward_fn("task:nope")
    assert get_reward_fn("auto", "task:addition", format_weight=0.1)("1+1=2 #2", {"answer": "2"}).score == 1.1


def test_score_samples_fills_samples_and_applies_length_penalty():
    fn = get_reward_fn("task:addition")
    samples = [
        Sample(prompt_ids=[1], record={"answer": "5"}, response_ids=[1] * n, response_text=t)
        for n, t in [(10, "2+3=5 #5"), (40, "2+3=5 #6"), (0, "")]
    ]
    score_samples(samples, fn, length_penalty=0.5, max_new_tokens=40)
    assert [s.reward for s in samples] == pytest.approx([1.0 - 0.125, 0.0 - 0.5, 0.0])
    assert samples[0].reward_details["raw_score"] == 1.0 and samples[0].reward_details["correct"]
    assert samples[1].reward_details["length_penalty"] == 0.5
    with pytest.raises(ValueError, match="max_new_tokens"):
        score_samples(samples, fn, length_penalty=0.1)


def test_score_samples_process_parallel_matches_sequential():
    fn = get_reward_fn("task:multiplication")
    texts = ["3*4=12 #12", "#13", "nothing", "#12"] * 3
    make = lambda: [Sample(prompt_ids=[1], record={"answer": "12"}, response_text=t) for t in texts]
    seq, par = make(), make()
    score_samples(seq, fn)
    score_samples(par, fn, num_workers=2)
    assert [s.reward for s in seq] == [s.reward for s in par] == [1.0, 0.0, 0.0, 1.0] * 3


def test_build_reward_fn_from_run_config():
    from rlad_megatron.config import load_config
    from rlad_megatron.rewards import build_reward_fn
    from rlad_megatron.rewards.math import MathReward

    cfg = load_config(None, ["reward.name=math", "reward.timeout_s=2.5", "reward.num_workers=3", "data.train=x.jsonl"])
    fn = build_reward_fn(cfg.reward, cfg.data)
    assert isinstance(fn, MathReward) and (fn.timeout_s, fn.num_workers) == (2.5, 3)
    cfg = load_config(None, ["data.train=task:multiplication", "reward.kwargs={format_weight: 0.5}"])
    assert build_reward_fn(cfg.reward, cfg.data)("2*3=6 #6", {"answer": "6"}).score == 1.5
    with pytest.raises(ValueError, match="num_workers"):
        load_config(None, ["reward.num_workers=0"])
