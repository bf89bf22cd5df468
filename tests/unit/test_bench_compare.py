"""The method comparison's statistics (against hand-computed values), plan, lr rule, locking and report,
without training; plus one end-to-end smoke run of every job kind that also checks resuming."""

from __future__ import annotations

import json
import math
import os

import pytest

from bench import compare_methods as cm
from bench import comparison_report as rep
from bench import comparison_stats as st


def _run(method, init, seed, curve, k=2, clip=0.0, other_temp=0.6):
    evals = [
        {"step": s, f"eval/avg@{k}": v, f"eval/avg@{k}@T{other_temp:g}": v / 2, f"eval/difficulty=4/avg@{k}": v / 4}
        for s, v in curve
    ]
    train = [
        {"step": i + 1, "clip_frac_high": clip, "clip_frac_low": 0.0, "zero_adv_group_frac": 0.5} for i in range(3)
    ]
    return {"spec": {"method": method, "init": init, "seed": seed}, "eval": evals, "train": train}


# ----------------------------------------------------------------------------- statistics vs hand values
def test_t_cdf_matches_closed_forms():
    for t in (-3.0, -0.5, 0.0, 0.7, 1.964, 4.0):
        assert st.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)  # Cauchy
        assert st.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_quantile_matches_tables():
    assert st.t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)
    assert st.t_quantile(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    assert st.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-7)


def test_paired_t_test_and_interval_by_hand():
    # diffs 1, 2, 6: mean 3, sd sqrt(7), t = 3 / (sqrt(7) / sqrt(3)) = 1.96396; df 2, where
    # P(T <= t) = 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2)
    t, p = st.paired_t_test([1.0, 2.0, 6.0])
    assert t == pytest.approx(3 / (math.sqrt(7) / math.sqrt(3)))
    assert p == pytest.approx(1 - t / math.sqrt(2 + t * t))
    mean, low, high = st.mean_ci([1.0, 2.0, 6.0])
    half = 4.302653 * math.sqrt(7) / math.sqrt(3)  # t_{0.975, 2} = 4.302653 (tables)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half), abs=1e-5)
    assert st.cohens_dz([1.0, 2.0, 6.0]) == pytest.approx(3 / math.sqrt(7))
    assert st.paired_t_test([0.5, 0.5]) == (math.inf, 0.0)
    with pytest.raises(ValueError, match="at least 2"):
        st.paired_t_test([1.0])


def test_sign_test_exact_binomial():
    assert st.sign_test([1, 1, 1, 1, 1, -1]) == (5, 6, pytest.approx(14 / 64))  # 2 * (1 + 6) / 2^6
    assert st.sign_test([1, 1, 0, -1]) == (2, 3, pytest.approx(1.0))  # tie dropped; 2 * (1 + 3) / 8 capped
    assert st.sign_test([1] * 5) == (5, 5, pytest.approx(2 / 32))


def test_holm_step_down_by_hand():
    # sorted p 0.005, 0.01, 0.03, 0.04 -> x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 -> monotone 0.06
    assert st.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert st.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_primary_metric_is_mean_of_last_evals_and_pairs_by_init_and_seed():
    a = [_run("rlad", 1, 1, [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.6)]), _run("rlad", 2, 1, [(0, 0.0), (1, 0.3)])]
    b = [_run("grpo", 1, 1, [(0, 0.1), (3, 0.2)]), _run("grpo", 1, 2, [(0, 0.1), (3, 0.9)])]
    assert st.mean_of_last(a[0], "eval/avg@2", 3) == pytest.approx(0.4)
    assert st.paired_values(a, b, "eval/avg@2", 2) == [pytest.approx((0.5, 0.15))]  # only (init 1, seed 1)


def test_lr_rule_takes_largest_rising_lr_within_clip_bound():
    def pilot(lr, rewards, clip):
        return {"lr": lr, "train": [{"reward/mean": r, "clip_frac_high": clip} for r in rewards]}

    pilots = [pilot(1e-4, [0.1, 0.1, 0.2], 0.005), pilot(5e-4, [0.1, 0.2, 0.3], 0.02), pilot(1e-3, [0.1, 0, 0.5], 0.09)]
    choice = st.choose_lr(pilots)
    assert choice["lr"] == 5e-4 and choice["clip_binds"]  # 1e-3 rose too but clips 9% > 5%
    flat = st.choose_lr([pilot(1e-4, [0.3, 0.2, 0.1], 0.0), pilot(5e-4, [0.3, 0.3, 0.3], 0.0)])
    assert flat["lr"] == 1e-4 and not flat["clip_binds"] and "smallest" in flat["reason"]


# ----------------------------------------------------------------------------- plan, configs, locks
def test_plan_orders_setup_first_and_runs_seed_major_with_dependencies():
    size = cm.SIZES["full"]
    jobs = cm.plan(size)
    kinds = [j.kind for j in jobs]
    assert kinds[: 1 + len(size.inits) + len(size.pilot_lrs)] == ["teacher"] + ["student"] * 2 + ["pilot"] * 3
    runs = [j for j in jobs if j.kind == "run"]
    assert len(runs) == len(size.seeds) * len(size.inits) * len(cm.METHODS) >= 70
    assert {j.seed for j in runs[: len(size.inits) * len(cm.METHODS)]} == {size.seeds[0]}
    assert {d.key for d in runs[-1].deps(size)} >= {"setup/teacher", f"setup/student_init{runs[-1].init}"}
    assert len({j.key for j in jobs}) == len(jobs)


@pytest.mark.parametrize("method", cm.METHODS)
def test_every_method_resolves_to_a_valid_config(tmp_path, method):
    from rlad_megatron.config import load_config

    size = cm.SIZES["full"]
    job = cm.Job("run", method, init=2, seed=3)
    cfg = load_config(None, cm.run_overrides(job, size, tmp_path, 5e-4, tmp_path / "run"))
    assert (cfg.seed, cfg.train.lr, cfg.rollout.temperature) == (3, 5e-4, 1.0)
    assert cfg.eval.temperature == 1.0 and cfg.eval.extra_temperatures == [0.6]
    start = str(tmp_path / "student_init2" / "start")
    assert cfg.model.student == start
    assert cfg.model.teacher == (start if method == "rlad_self_teacher" else str(tmp_path / "teacher"))
    assert cfg.algorithm.dynamic_sampling == (method in cm.REWARD_DRIVEN)
    updates = cfg.train.ppo_epochs * cfg.train.num_minibatches
    assert updates == (1 if method == "rlad_one_update" else 4)
    with pytest.raises(ValueError, match="unknown method"):
        cm.method_overrides("ppo", size)


def test_claim_is_exclusive_and_takes_over_dead_holders(tmp_path):
    lock = tmp_path / "locks" / "a.lock"
    assert cm.claim(lock) and not cm.claim(lock)  # our own live pid holds it
    lock.write_text("999999999")  # a pid that cannot exist: its worker died
    assert cm.claim(lock) and lock.read_text() == str(os.getpid())


# ----------------------------------------------------------------------------- report
def test_report_rebuilds_tables_from_result_files(tmp_path):
    size = cm.resolve_size("tiny", ["last_evals=1"])
    results = tmp_path / "results"
    for seed, (r, g, s) in enumerate([(0.6, 0.4, 0.5), (0.7, 0.4, 0.5), (0.5, 0.45, 0.6)], start=1):
        for method, value, clip in (("rlad", r, 0.02), ("grpo", g, 0.0), ("rlad_self_teacher", s, 0.0)):
            path = results / "runs" / method / f"init1_seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_run(method, 1, seed, [(0, 0.1), (2, value)], clip=clip)))
    doc = tmp_path / "docs" / "method_comparison.md"
    doc.parent.mkdir()
    doc.write_text(f"# Title\n\nBefore.\n\n{rep.BEGIN}\nold\n{rep.END}\n\nAfter.\n")
    block = rep.write_report(results, size, "tiny", doc, doc.parent / "img" / "method_comparison")
    text = doc.read_text()
    assert "Before." in text and "After." in text and "\nold\n" not in text
    # RLAD - GRPO = 0.2, 0.3, 0.05: mean 0.183, all three RLAD wins (sign p = 0.25)
    _, p = st.paired_t_test([0.2, 0.3, 0.05])
    p_holm = st.holm([p, st.paired_t_test([0.1, 0.2, -0.1])[1]])[0]
    assert "| GRPO | 3 | 0.600 | 0.417 | +0.183 [" in block
    assert f"| {p:.3g} | {p_holm:.3g} | 3/3 (0.25) |" in block
    assert "RLAD (alpha 0.5): clip fraction 2.00%" in block and "the trust region binds" in block
    assert "RLAD, teacher = initial student: clip fraction 0.00%" in block and "not tested" in block
    assert (doc.parent / "img" / "method_comparison" / "tiny_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_smoke_comparison_runs_every_job_kind_and_resumes(tmp_path):
    """Teacher, two students, two pilots and GRPO / RLAD / RLAD-self-teacher runs on 2 inits x 2 seeds; the
    rerun does nothing and the report rebuilds from the result files."""
    argv = ["--size", "tiny", "--results", str(tmp_path / "res"), "--work", str(tmp_path / "work")]
    argv += ["--workers", "1", "--methods", "grpo", "rlad", "rlad_self_teacher", "--doc", str(tmp_path / "doc.md")]
    assert cm.main(argv) == 0
    res = tmp_path / "res" / "tiny"
    runs = sorted(res.glob("runs/*/*.json"))
    assert len(runs) == 3 * 2 * 2
    first = {p: p.stat().st_mtime_ns for p in runs}
    rlad = json.loads((res / "runs" / "rlad" / "init2_seed1.json").read_text())
    assert rlad["spec"] == {"method": "rlad", "init": 2, "seed": 1}
    assert "eval/avg@2@T0.6" in rlad["eval"][-1]
    assert any(key.startswith("eval/difficulty=") for key in rlad["eval"][-1])
    assert "clip_differs_from_grpo_frac" in rlad["train"][-1]
    student = json.loads((res / "setup" / "student_init1.json").read_text())
    assert [s["steps"] for s in student["segments"]] == [1, 2]
    assert cm.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == first
    text = (tmp_path / "doc.md").read_text()
    assert "RLAD vs" in text
    worst = float(text.split("step-1 mean lp_old - lp_T is at most ")[1].split(" ")[0])
    assert worst < 1e-4  # teacher = initial student: teacher scoring agrees with the trainer
