"""The method comparison's statistics, plan, locking and report, without training (plus one smoke run)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import compare_methods as cm
import comparison_report as rep
import comparison_stats as st


def _result(method, seed, curve, task="addition", k=4, times=None):
    evals = [{"step": s, "kind": "eval", f"eval/avg@{k}": v, f"eval/pass@{k}": min(1.0, 2 * v)} for s, v in curve]
    train = [{"step": i + 1, "kind": "train", **{f"time/{p}": t for p, t in (times or {}).items()}} for i in range(3)]
    return {"spec": {"group": "main", "task": task, "method": method, "seed": seed}, "eval": evals, "train": train}


def test_mean_std_uses_sample_std():
    assert st.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert st.mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in st.mean_std([]))


def test_steps_to_reach_first_crossing_or_none():
    assert st.steps_to_reach([0, 4, 8, 12], [0.1, 0.3, 0.5, 0.4], 0.45) == 8
    assert st.steps_to_reach([0, 4, 8], [0.1, 0.2, 0.3], 0.31) is None
    assert st.steps_to_reach([0, 4], [0.1, 0.3 - 1e-12], 0.3) == 4  # float round-off tolerated


def test_mean_curve_over_common_steps_and_final():
    a, b = _result("grpo", 1, [(0, 0.1), (4, 0.3), (8, 0.5)]), _result("grpo", 2, [(0, 0.3), (4, 0.5)])
    steps, mean, sd = st.mean_curve([a, b], "eval/avg@4")
    assert steps == [0, 4] and mean == pytest.approx([0.2, 0.4]) and sd == pytest.approx([math.sqrt(0.02)] * 2)
    assert st.final(a, "eval/avg@4") == 0.5
    with pytest.raises(ValueError, match="no eval rows"):
        st.final({"spec": {}, "eval": []}, "eval/avg@4")


def test_paired_diff_counts_wins_on_common_seeds():
    rlad = st.by_seed([_result("rlad", s, [(0, 0.0), (4, v)]) for s, v in [(1, 0.5), (2, 0.4), (3, 0.9)]])
    grpo = st.by_seed([_result("grpo", s, [(0, 0.0), (4, v)]) for s, v in [(1, 0.3), (2, 0.6)]])
    mean, sd, wins, n = st.paired_diff(rlad, grpo, "eval/avg@4")
    assert (wins, n) == (1, 2) and mean == pytest.approx(0.0) and sd == pytest.approx(math.sqrt(0.08))


def test_phase_times_skip_warmup_step():
    r = _result("rlad", 1, [(0, 0.0)], times={"score": 1.0, "step": 3.0})
    r["train"][0]["time/step"] = 100.0  # warm-up outlier on the first step
    assert st.phase_times([r]) == {"score": 1.0, "step": 3.0}


def test_method_rows_steps_to_reach_grpo_final():
    size = cm.SIZES["small"]
    groups = st.group_results(
        [_result("grpo", s, [(0, 0.1), (12, 0.3), (24, 0.5)]) for s in (1, 2)]
        + [_result("rlad", s, [(0, 0.1), (12, 0.5), (24, 0.6)]) for s in (1, 2)]
        + [_result("opd", s, [(0, 0.1), (12, 0.2), (24, 0.2)]) for s in (1, 2)]
    )
    rows = {r["method"]: r for r in rep.method_rows(groups, "addition", ("grpo", "rlad", "opd"), size)}
    assert rows["grpo"]["steps_to_grpo_final"] == 24 and rows["rlad"]["steps_to_grpo_final"] == 12
    assert rows["opd"]["steps_to_grpo_final"] is None
    assert rows["rlad"]["avg"] == pytest.approx((0.6, 0.0)) and rows["rlad"]["seeds"] == [1, 2]
    assert rows["rlad"]["change"] == pytest.approx((0.5, 0.0))
    falling = st.group_results([_result("grpo", 1, [(0, 0.5), (24, 0.4)]), _result("rlad", 1, [(0, 0.5), (24, 0.45)])])
    assert {r["steps_to_grpo_final"] for r in rep.method_rows(falling, "addition", ("grpo", "rlad"), size)} == {"n/a"}


def test_plan_is_seed_major_and_filterable():
    size = cm.SIZES["small"]
    specs = cm.plan(size, ("main",))
    assert len(specs) == len(size.seeds) * len(size.tasks) * len(cm.MAIN_METHODS)
    first_seed_block = specs[: len(size.tasks) * len(cm.MAIN_METHODS)]
    assert {s.seed for s in first_seed_block} == {size.seeds[0]}
    assert {s.method for s in cm.plan(size, ("main", "ablation"), ["grpo", "rlad_a0.1"])} == {"grpo", "rlad_a0.1"}


@pytest.mark.parametrize("method", cm.MAIN_METHODS + cm.EXPLAIN_METHODS + ("rlad_a0.3",))
def test_every_method_resolves_to_a_valid_config(tmp_path, method):
    from rlad_megatron.config import load_config

    paths = {k: tmp_path / k for k in ("train", "test", "teacher", "student")}
    spec = cm.RunSpec("main", "addition", method, 1)
    cfg = load_config(None, cm.run_overrides(spec, cm.SIZES["small"], paths, tmp_path / "run"))
    assert cfg.train.num_steps == cm.SIZES["small"].num_steps and cfg.seed == 1
    expected_teacher = paths["student"] if method == "rlad_weak_teacher" else paths["teacher"]
    assert cfg.model.teacher == str(expected_teacher)
    if method == "rlad_a0.3":
        assert (cfg.algorithm.name, cfg.algorithm.alpha) == ("rlad", 0.3)
    if method == "kdrl_anneal":  # beta reaches its floor by the last step
        a = cfg.algorithm
        assert a.kd_coef_start - a.kd_coef_decay * cfg.train.num_steps == pytest.approx(a.kd_coef_min, abs=1e-4)
    with pytest.raises(ValueError, match="unknown method"):
        cm.method_overrides("ppo", 10)


def test_claim_is_exclusive_and_takes_over_dead_holders(tmp_path):
    lock = tmp_path / "locks" / "a.lock"
    assert cm.claim(lock) and not cm.claim(lock)  # our own live pid holds it
    lock.write_text("999999999")  # a pid that cannot exist: its worker died
    assert cm.claim(lock) and lock.read_text() == str(os.getpid())


def test_report_splices_generated_block_and_keeps_analysis(tmp_path):
    size = cm.SIZES["small"]
    out = tmp_path / "small"
    for method in ("grpo", "rlad"):
        for seed in (1, 2):
            path = out / "addition" / method / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_result(method, seed, [(0, 0.1), (24, 0.3 if method == "grpo" else 0.4)])))
    doc = tmp_path / "docs" / "method_comparison.md"
    doc.parent.mkdir()
    doc.write_text(f"# Title\n\nAnalysis before.\n\n{rep.BEGIN}\nold\n{rep.END}\n\nAnalysis after.\n")
    block = rep.write_report(out, size, "small", doc)
    text = doc.read_text()
    assert "Analysis before." in text and "Analysis after." in text and "\nold\n" not in text
    assert "| RLAD (alpha 0.5) | 2 | 0.400 ± 0.000 |" in block
    assert "| GRPO | +0.100 ± 0.000 | 2/2 |" in block
    assert (doc.parent / "img" / "method_comparison" / "addition_curves.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["tasks"]["addition"][0]["method"] == "grpo"


@pytest.mark.slow
def test_smoke_tiny_comparison_is_resumable(tmp_path):
    """Two methods, 2 steps each, from a just-built teacher/student; the rerun skips finished runs."""
    argv = [
        "--size",
        "tiny",
        "--out",
        str(tmp_path),
        "--groups",
        "main",
        "--methods",
        "grpo",
        "rlad",
        "--doc",
        str(tmp_path / "doc.md"),
    ]
    assert cm.main(argv) == 0
    results = sorted((tmp_path / "tiny" / "addition").glob("*/seed1.json"))
    assert [p.parent.name for p in results] == ["grpo", "rlad"]
    first = [p.stat().st_mtime_ns for p in results]
    rows = json.loads(results[1].read_text())
    assert [r["step"] for r in rows["train"]] == [1, 2] and rows["eval"][-1]["step"] == 2
    assert "time/score" in rows["train"][0]  # RLAD scores with the teacher; GRPO does not
    assert "time/score" not in json.loads(results[0].read_text())["train"][0]
    assert cm.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in results] == first
