"""`rlad rehearse` of both shipped recipes, CI-sized: the rendered job script runs under the fake srun with
node agents, sglang-router, `rlad serve` fleets and the torchrun trainer, then again as the requeued attempt.

* qwen3_kk (1 node, trainer TP=2): the job and its requeue pass every check; a kill -9 of the trainer ranks
  after step 1's checkpoint, then the requeued attempt, ends with the uninterrupted run's metrics (as
  tests/integration/test_train_resume.py proves for a single process).
* qwen3_math (context parallelism CP=2 over 3 emulated nodes): one rollout server is killed -9 during step 2;
  every step still trains on exactly prompts x group samples, the node agent restarts the server and it
  serves the final weights version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from train_helpers import subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.dist]
KK, MATH = "examples/qwen3_kk/recipe.yaml", "examples/qwen3_math/recipe.yaml"
KK_SMALL = ["train.prompts_per_step=1", "--steps", "2"]  # K&K prompts are ~700 tokens: one group per step
TIMING = ("time/", "throughput/")


def rehearse(out: Path, recipe: str, *args: str) -> dict:
    log = out.parent / f"{out.name}.log"
    with open(log, "w") as sink:
        code = subprocess.run(
            [sys.executable, "-m", "rlad_megatron.cli", "rehearse", recipe, "--out", str(out), *args],
            env=subprocess_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            timeout=1200,
        ).returncode
    report = json.loads((out / "rehearsal.json").read_text()) if (out / "rehearsal.json").exists() else {}
    assert code == 0, f"rlad rehearse exited {code}:\n{log.read_text()[-4000:]}"
    return report


def checks(report: dict) -> dict[str, bool]:
    return {c["name"]: c["ok"] for c in report["checks"]}


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def run_config(out: Path) -> dict:
    return yaml.safe_load((out / "run" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def kk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rehearse") / "kk"
    rehearse(out, KK, *KK_SMALL)
    return out


@pytest.fixture(scope="module")
def math_with_server_killed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rehearse") / "math"
    rehearse(out, MATH, "--steps", "8", "--kill-server-at-step", "2")  # 6 steps after the kill: time to rejoin
    return out


def test_tensor_parallel_job_and_its_requeue_pass_every_check(kk):
    report = json.loads((kk / "rehearsal.json").read_text())
    assert report["ok"] and all(checks(report).values())
    assert {
        "rollout log-probs",
        "teacher via router",
        "weight versions (attempt 1)",
        "requeued attempt resumed",
    } <= set(checks(report))
    cfg = run_config(kk)
    assert (cfg["parallel"]["tensor_model_parallel_size"], cfg["launch"]["nodes"]) == (2, 1)
    assert [(a["restart"], a["exit_code"], a["resumed_from"]) for a in report["attempts"]] == [
        (0, 0, ""),
        (1, 0, "step_2"),
    ]
    assert all(r["time/train"] > 0 and r["time/sync"] > 0 for r in train_rows(kk))
    # the recipe's own plan estimate (cluster seconds) is printed beside the measured phases
    assert report["plan_seconds"]["generate"] > report["plan_seconds"]["train"] > 0
    assert report["measured_seconds_per_step"]["train"] > 0
    assert "`rlad plan` estimate beside this rehearsal" in (kk / "rehearsal.md").read_text()


def test_killed_trainer_resumes_on_requeue_and_matches_the_uninterrupted_run(kk, tmp_path):
    out = tmp_path / "kk_killed"
    report = rehearse(out, KK, *KK_SMALL, "--kill-trainer-at-step", "1")
    first, second = report["attempts"]
    assert [f["kind"] for f in first["faults"]] == ["trainer"] and first["exit_code"] != 0
    assert (second["exit_code"], second["resumed_from"]) == (0, "step_1")
    expected, got = train_rows(kk), train_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2]
    for want, have in zip(expected, got):
        keys = {k for k in want if not k.startswith(TIMING)}
        assert keys == {k for k in have if not k.startswith(TIMING)}
        for key in keys - {"kind"}:
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (want["step"], key)


def test_off_policy_overlap_job_passes_every_check(tmp_path):
    out = tmp_path / "kk_overlap"
    report = rehearse(out, KK, "train.prompts_per_step=1", "train.max_staleness=1", "--steps", "3")
    ok = checks(report)
    assert report["ok"] and all(ok.values()) and "off-policy overlap" in ok
    rows = train_rows(out)
    assert [r["staleness/max"] for r in rows] == [0.0, 1.0, 1.0]  # steps 2 and 3 were generated during 1 and 2
    assert all(r["tis/weight_mean"] > 0 for r in rows[1:])  # truncated importance weights on the stale steps


def test_context_parallel_job_over_three_emulated_nodes(math_with_server_killed):
    report = json.loads((math_with_server_killed / "rehearsal.json").read_text())
    ok = checks(report)
    assert ok["rollout log-probs"] and ok["teacher via router"] and ok["steps"] and ok["requeued attempt resumed"]
    cfg = run_config(math_with_server_killed)
    par = cfg["parallel"]
    layout = (par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"], par["context_parallel_size"])
    assert layout == (1, 1, 2)
    servers = {(s["fleet"], s["url"].rsplit(":", 1)[0]) for s in report["attempts"][0]["servers"]}
    assert servers == {("teacher", "http://127.0.0.1"), ("rollout", "http://127.0.0.2")}  # one node per role


def test_rollout_server_killed_mid_step_is_restarted_and_rejoins(math_with_server_killed):
    report = json.loads((math_with_server_killed / "rehearsal.json").read_text())
    assert [f["kind"] for f in report["attempts"][0]["faults"]] == ["server"]
    ok = checks(report)
    assert ok["samples once"] and ok["killed server restarted"] and ok["killed server rejoined"]
    assert ok["weight versions (attempt 0)"] and report["ok"]
