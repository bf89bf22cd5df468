"""The CPU demo in reduced size: every stage runs, the report is written, a rerun reuses the cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import subprocess_env

pytestmark = pytest.mark.slow
DEMO = Path(__file__).resolve().parents[2] / "examples" / "cpu_demo" / "run_demo.py"


def _demo(out: Path) -> str:
    env = subprocess_env()
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_cpu_demo_smoke_runs_every_stage_and_reuses_the_cache(tmp_path):
    first = _demo(tmp_path)
    for stage in (
        "[1/6] tokenizer",
        "[2/6] teacher",
        "[3/6] student warm start",
        "[4/6] held-out eval",
        "[5/6] rlad: 2 steps",
        "[6/6] done",
    ):
        assert stage in first
    assert "(cached)" not in first
    assert "| student after rlad |" in first and "tensorboard --logdir" in first
    run = tmp_path / "smoke"
    assert (run / "report" / "report.md").exists() and (run / "report" / "reward.png").exists()
    assert list((run / "rlad" / "tb").glob("events.out.tfevents.*"))
    assert "eval" in (run / "rlad" / "metrics.jsonl").read_text()
    second = _demo(tmp_path)
    assert "characters in" in second and second.count("(cached)") == 3  # tokenizer, teacher, student
