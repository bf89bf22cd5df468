"""`rlad plan` with streaming scoring and off-policy overlap: step time each way, utilization per role, node split."""

from __future__ import annotations

import pytest

from rlad_megatron.config import load_config
from rlad_megatron.launch.plan import format_plan, make_plan, overlap_report, recommend_node_split, step_seconds

TIMES = {"generate": 100.0, "teacher_score": 60.0, "train": 20.0, "weight_sync": 5.0}


def test_streaming_hides_the_teacher_under_generation_but_its_last_group():
    assert step_seconds(TIMES, 10, streaming=False) == 185.0
    assert step_seconds(TIMES, 10, streaming=True) == 100.0 + 6.0 + 25.0
    slow_teacher = dict(TIMES, teacher_score=150.0)  # the teacher is then the bottleneck of the overlap
    assert step_seconds(slow_teacher, 10, streaming=True) == 150.0 + 15.0 + 25.0
    assert step_seconds(dict(TIMES, teacher_score=0.0), 10, streaming=True) == 125.0


def test_off_policy_overlap_takes_the_longer_of_collection_and_training_then_the_sync():
    collect = 100.0 + 6.0  # streaming: generation, then the last group's scoring
    assert step_seconds(TIMES, 10, streaming=True, off_policy=True) == collect + 5.0
    slow_train = dict(TIMES, train=300.0)  # training is then what the step waits for
    assert step_seconds(slow_train, 10, streaming=True, off_policy=True) == 300.0 + 5.0
    assert step_seconds(TIMES, 10, streaming=False, off_policy=True) == 160.0 + 5.0
    assert overlap_report(TIMES, 10)["off_policy"]["utilization"] == pytest.approx(
        {"trainer": 25 / 111, "rollout": 105 / 111, "teacher": 60 / 111}
    )


def test_node_split_for_an_off_policy_recipe_models_the_overlap():
    nodes = {"trainer": 4, "rollout": 2, "teacher": 2}
    times = dict(TIMES, train=200.0)  # a training phase worth hiding
    plain = recommend_node_split(times, nodes, 10, trainer_fits=lambda n: True)
    overlapped = recommend_node_split(times, nodes, 10, trainer_fits=lambda n: True, off_policy=True)
    assert overlapped["off_policy"] and not plain["off_policy"]
    assert overlapped["step"] < plain["step"]
    n = overlapped["nodes"]
    scaled = {"generate": 100.0 * 2 / n["rollout"], "teacher_score": 60.0 * 2 / n["teacher"]}
    scaled.update(train=200.0 * 4 / n["trainer"], weight_sync=5.0)
    assert overlapped["step"] == pytest.approx(step_seconds(scaled, 10, streaming=True, off_policy=True))


def test_utilization_is_busy_time_over_step_time():
    report = overlap_report(TIMES, 10)
    after, stream = report["after_generation"]["utilization"], report["streaming"]["utilization"]
    assert after == pytest.approx({"trainer": 25 / 185, "rollout": 105 / 185, "teacher": 60 / 185})
    assert stream == pytest.approx({"trainer": 25 / 131, "rollout": 105 / 131, "teacher": 60 / 131})


def test_node_split_moves_nodes_to_the_slow_phase_and_keeps_the_total():
    nodes = {"trainer": 4, "rollout": 2, "teacher": 2}
    best = recommend_node_split(TIMES, nodes, 10, trainer_fits=lambda n: True)
    assert sum(best["nodes"].values()) == 8 and best["nodes"]["rollout"] > 2
    assert best["step"] < step_seconds(TIMES, 10, streaming=True)
    fits_from_3 = recommend_node_split(TIMES, nodes, 10, trainer_fits=lambda n: n >= 3)
    assert fits_from_3["nodes"]["trainer"] >= 3
    no_teacher = recommend_node_split(dict(TIMES, teacher_score=0.0), dict(nodes, teacher=0), 10, lambda n: True)
    assert no_teacher["nodes"]["teacher"] == 0


def test_math_recipe_plan_reports_overlap_and_a_split():
    plan = make_plan(load_config("examples/qwen3_math/recipe.yaml"))
    assert plan["overlap"]["streaming"]["step"] < plan["overlap"]["after_generation"]["step"]
    assert plan["overlap"]["after_generation"]["step"] == pytest.approx(plan["seconds"]["total"])
    assert plan["node_split"]["step"] <= plan["overlap"]["streaming"]["step"]
    assert plan["overlap"]["off_policy"]["step"] < plan["overlap"]["streaming"]["step"]
    assert "streaming scoring + train.max_staleness=1" in format_plan(plan)
    off_policy = make_plan(load_config("examples/qwen3_math/recipe.yaml", ["train.max_staleness=1"]))
    assert off_policy["node_split"]["off_policy"]
    assert off_policy["node_split"]["step"] < plan["node_split"]["step"]
