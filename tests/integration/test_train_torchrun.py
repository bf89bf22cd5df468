"""torchrun with tensor or pipeline parallelism (2 gloo ranks): rank 0 drives the engines and
broadcasts the samples; the metrics match a single-process run of the same recipe. With PP the
weight sync goes through an HF folder on disk, so a wrong sync would show in the step-2 metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_models, subprocess_env

pytestmark = [pytest.mark.dist, pytest.mark.slow]
KEYS = ("reward/mean", "response_length/mean", "loss", "grad_norm", "kl/rollout_vs_old_k1", "kl/old_vs_teacher_k1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, tmp_path: Path):
    env = subprocess_env()
    log = tmp_path / "log.txt"
    with open(log, "ab") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False).returncode
    assert code == 0, log.read_text()[-3000:]


def _metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _recipe(tmp_path: Path, train_extra: str = "", checkpoint_interval: int = 0) -> Path:
    student, teacher = make_models(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
seed: 5
model: {{student: {student}, teacher: {teacher}}}
algorithm: {{name: opd, group_size: 2}}
rollout: {{kind: embedded, max_new_tokens: 6}}
teacher: {{kind: embedded}}
data: {{train: "task:addition", task_kwargs: {{size: 8}}}}
train: {{num_steps: 2, prompts_per_step: 2, lr: 0.01{train_extra}}}
checkpoint: {{interval: {checkpoint_interval}, save_hf: true}}
logging: {{tensorboard: false, progress_bar: false}}
""")
    return recipe


def _torchrun(cli: list[str], tmp_path: Path, run_dir: Path, layout: str) -> list[dict]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    _run(torchrun + cli + [f"run_dir={run_dir}", layout], tmp_path)
    return _metrics(run_dir)


def _assert_match(single: list[dict], parallel: list[dict], name: str, keys=KEYS) -> None:
    assert [r["step"] for r in parallel] == [r["step"] for r in single]
    for a, b in zip(single, parallel):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, a["step"], key)


def test_tensor_and_pipeline_parallel_2_match_single_process(tmp_path):
    cli = ["-m", "rlad_megatron.train_cli", "--config", str(_recipe(tmp_path))]
    _run([sys.executable] + cli + [f"run_dir={tmp_path / 'single'}"], tmp_path)
    single = _metrics(tmp_path / "single")
    assert [r["step"] for r in single] == [1, 2]
    for name, layout in (
        ("tp2", "parallel.tensor_model_parallel_size=2"),
        ("pp2", "parallel.pipeline_model_parallel_size=2"),
    ):
        _assert_match(single, _torchrun(cli, tmp_path, tmp_path / name, layout), name)
        assert (tmp_path / name / "hf" / "latest").exists()


def test_max_staleness_1_under_tensor_parallel_2_matches_single_process(tmp_path):
    """Rank 0 generates the next step in the background while both ranks train; the other rank only joins the
    broadcasts and syncs, and a checkpoint (every step) carries the prefetched samples to every rank."""
    cli = ["-m", "rlad_megatron.train_cli", "--config", str(_recipe(tmp_path, ", max_staleness: 1", 1))]
    _run([sys.executable] + cli + [f"run_dir={tmp_path / 'single'}"], tmp_path)
    single = _metrics(tmp_path / "single")
    assert [r["staleness/mean"] for r in single] == [0.0, 1.0]
    parallel = _torchrun(cli, tmp_path, tmp_path / "tp2", "parallel.tensor_model_parallel_size=2")
    _assert_match(single, parallel, "tp2", KEYS + ("staleness/mean", "tis/weight_mean"))
