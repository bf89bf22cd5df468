"""rlad report: plots and table from the metrics jsonl that observe.Observer writes."""

import json
from types import SimpleNamespace

import pytest

from rlad_megatron import report
from rlad_megatron.config import LoggingConfig
from rlad_megatron.observe import (
    Observer,
    PhaseTimer,
    log_line,
    read_metrics,
    truncate_metrics,
)


def _write_run(run_dir, rewards, evals, algorithm):
    cfg = LoggingConfig(tensorboard=False, progress_bar=False, rollout_samples=2)
    obs = Observer(run_dir, cfg, num_steps=len(rewards))
    for step, reward in enumerate(rewards, start=1):
        obs.log_step(step, {"reward/mean": reward, "accuracy": reward, "not_scalar": [1, 2]})
    for step, acc in evals:
        obs.log_eval(step, {"avg@4": acc, "pass@4": min(1.0, acc * 2)})
    obs.close()
    (run_dir / "config.yaml").write_text(f"algorithm:\n  name: {algorithm}\n")


def test_report_writes_plots_and_table(tmp_path):
    _write_run(tmp_path / "grpo", [0.1, 0.2, 0.3], [(0, 0.1), (3, 0.25)], "grpo")
    _write_run(tmp_path / "rlad", [0.2, 0.4, 0.5], [(0, 0.1), (3, 0.4)], "rlad")
    written = report.write_report([tmp_path / "grpo", tmp_path / "rlad"], tmp_path / "out")
    assert written["reward"].stat().st_size > 1000 and written["eval"].stat().st_size > 1000
    md = written["table"].read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| rlad", "| grpo"))]
    assert len(rows) == 2
    rlad_cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    # run, algorithm, steps, reward first, reward last, avg@4 first/last/best, pass@4 first/last/best
    assert rlad_cells[:5] == ["rlad", "rlad", "3", "0.200", "0.500"]
    assert rlad_cells[5:8] == ["0.100", "0.400", "0.400"]
    assert rlad_cells[8:] == ["0.200", "0.800", "0.800"]


def test_report_missing_run_is_a_clear_error(tmp_path, capsys):
    args = SimpleNamespace(run_dirs=[str(tmp_path / "nope")], out=str(tmp_path / "out"))
    assert report.run(args) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().out


def test_metrics_truncated_on_resume_and_torn_line_ignored(tmp_path):
    _write_run(tmp_path, [0.1, 0.2, 0.3], [], "grpo")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    truncate_metrics(tmp_path, 2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["reward/mean"] == pytest.approx(0.2)


def test_phase_timer_and_log_line():
    timer = PhaseTimer()
    with timer("generate"):
        pass
    with timer("train"):
        pass
    metrics = timer.metrics()
    assert set(metrics) == {"time/generate", "time/train", "time/step"}
    line = log_line(2, 5, {"reward/mean": 0.25, "accuracy": 0.5, **metrics})
    assert line.startswith("step 2/5 | reward 0.250 | acc 0.50")
