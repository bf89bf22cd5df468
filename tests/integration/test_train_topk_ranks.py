"""GKD's teacher top-k columns reach the trainer ranks as flat tensors, each rank getting only the samples its
data-parallel rank trains on: torchrun with 2 gloo ranks (data parallel 2, then tensor parallel 2) and two
minibatches per step gives the metrics of a single-process run of the same recipe."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import make_models, subprocess_env

pytestmark = [pytest.mark.dist, pytest.mark.slow]
KEYS = ("reward/mean", "response_length/mean", "loss", "grad_norm")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, log: Path):
    with open(log, "ab") as out:
        code = subprocess.run(
            cmd, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT, timeout=600, check=False
        ).returncode
    assert code == 0, log.read_text()[-3000:]


def _metrics(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_gkd_topk_sent_per_data_parallel_rank_matches_single_process(tmp_path):
    student, teacher = make_models(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
seed: 5
model: {{student: {student}, teacher: {teacher}}}
algorithm: {{name: gkd, group_size: 2, gkd_top_k: 4}}
rollout: {{kind: embedded, max_new_tokens: 6}}
teacher: {{kind: embedded}}
data: {{train: "task:addition", task_kwargs: {{size: 8}}}}
train: {{num_steps: 2, prompts_per_step: 4, num_minibatches: 2, lr: 0.01}}
checkpoint: {{interval: 0, save_hf: false}}
logging: {{tensorboard: false, progress_bar: false}}
""")
    cli = ["-m", "rlad_megatron.train_cli", "--config", str(recipe)]
    _run([sys.executable] + cli + [f"run_dir={tmp_path / 'single'}"], tmp_path / "log.txt")
    single = _metrics(tmp_path / "single")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    for name, layout in (
        ("dp2", "parallel.tensor_model_parallel_size=1"),
        ("tp2", "parallel.tensor_model_parallel_size=2"),
    ):
        _run(
            torchrun + ["--master_port", str(_port())] + cli + [f"run_dir={tmp_path / name}", layout],
            tmp_path / "log.txt",
        )
        parallel = _metrics(tmp_path / name)
        assert [r["step"] for r in parallel] == [1, 2]
        for a, b in zip(single, parallel):
            for key in KEYS:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (name, a["step"], key)
