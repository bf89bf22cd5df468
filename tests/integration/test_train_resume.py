"""Resume: kill -9 between steps, during a step, during weight export and during a checkpoint save,
restart with the same command, and the metrics equal an uninterrupted run's step for step.
With train.max_staleness=1 too: a checkpoint holds the next step's samples, generated in the background
with the weights one update older, so the resumed run trains on exactly what the uninterrupted one did.

The killed runs go through a small driver that wraps one internal function to SIGKILL its own
process at a chosen step (a deterministic kill point); the last kill comes from outside at a
random moment inside the last step (asserted to have hit a live run). OPD goes through every kill
point; RLAD (teacher-anchored trust region) and GKD (teacher top-k) through the random one.
Restarts are the plain `python -m rlad_megatron.train_cli` command.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_helpers import make_models, subprocess_env

pytestmark = pytest.mark.slow

DRIVER = """
import os, signal, sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point, at_step):
    if point == "train_step":  # optimizer step applied in memory, nothing saved yet
        from rlad_megatron.backends.megatron import trainer as T
        orig = T.MegatronTrainer.train_step
        def train_step(self, samples, advantages, step, **kw):
            out = orig(self, samples, advantages, step, **kw)
            if step == at_step:
                die()
            return out
        T.MegatronTrainer.train_step = train_step
    elif point == "export":  # the at_step-th weight sync of this process (the resume sync is the 1st)
        from rlad_megatron.backends.megatron import weight_export as W
        orig = W.export_hf_tensors
        calls = {"n": 0}
        def export(*a, **kw):
            calls["n"] += 1
            if calls["n"] == at_step:
                die()
            return orig(*a, **kw)
        W.export_hf_tensors = export
    elif point == "save":  # checkpoint fully written to step_N.tmp, not yet published
        from rlad_megatron.backends.megatron import checkpoint as C
        orig = C._publish
        def publish(root, tmp, final):
            if final.name == f"step_{at_step}":
                die()
            return orig(root, tmp, final)
        C._publish = publish

if __name__ == "__main__":
    arm(sys.argv[1], int(sys.argv[2]))
    from rlad_megatron.train_cli import main
    sys.exit(main(sys.argv[3:]))
"""

NUM_STEPS = 5


def _recipe(root: Path, run_dir: Path, algorithm: str = "opd", extra: str = "", train_extra: str = "") -> Path:
    student, teacher = make_models(root)
    recipe = root / f"{run_dir.name}.yaml"
    recipe.write_text(f"""
run_dir: {run_dir}
seed: 11
model: {{student: {student}, teacher: {teacher}}}
algorithm: {{name: {algorithm}, group_size: 2{extra}}}
rollout: {{kind: embedded, max_new_tokens: 6}}
teacher: {{kind: embedded}}
data: {{train: "task:addition", task_kwargs: {{size: 8}}}}
train: {{num_steps: {NUM_STEPS}, prompts_per_step: 2, lr: 0.01{train_extra}}}
checkpoint: {{interval: 1, keep_last: 2, save_hf: false}}
logging: {{tensorboard: false, progress_bar: false}}
""")
    return recipe


def _env():
    return subprocess_env()


def _start(cmd, log: Path) -> subprocess.Popen:
    """Own session, output to a file: dist_checkpointing's helper processes outlive a SIGKILLed
    trainer, and pipes they inherited would block; the session lets _reap end exactly them."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _reap(proc: subprocess.Popen, timeout: float = 300) -> int:
    try:
        code = proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this run's own session only
        except ProcessLookupError:
            pass
    return code


def _cli(recipe: Path):
    return [sys.executable, "-m", "rlad_megatron.train_cli", "--config", str(recipe)]


def _raw_rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rows(run_dir: Path):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in _raw_rows(run_dir)]


def _latest(run_dir: Path) -> str:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else ""


def test_kill_anywhere_then_resume_reproduces_metrics(tmp_path):
    _kill_anywhere_then_resume(tmp_path)


def test_kill_anywhere_with_max_staleness_1_then_resume_reproduces_metrics(tmp_path):
    rows = _kill_anywhere_then_resume(tmp_path, "rlad", train_extra=", max_staleness: 1")
    assert [r["staleness/mean"] for r in rows] == [0.0] + [1.0] * (NUM_STEPS - 1)


def _kill_anywhere_then_resume(tmp_path: Path, algorithm: str = "opd", train_extra: str = "") -> list[dict]:
    """Kills at fixed points (in an optimizer step, while publishing a checkpoint, in a weight export) and at
    a random moment of the last step, each followed by the plain command; returns the final metric rows,
    asserted equal to the uninterrupted run's."""
    base_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    log = tmp_path / "log.txt"
    base_recipe = _recipe(tmp_path, base_dir, algorithm, train_extra=train_extra)
    assert _reap(_start(_cli(base_recipe), log)) == 0, log.read_text()[-2000:]
    expected = _rows(base_dir)
    assert [r["step"] for r in expected] == list(range(1, NUM_STEPS + 1))

    recipe = _recipe(tmp_path, run_dir, algorithm, train_extra=train_extra)
    driver = tmp_path / "kill_driver.py"
    driver.write_text(DRIVER)
    # (kill point, step or call number, checkpoint that must survive)
    for point, at, survivor in (("train_step", 2, "step_1"), ("save", 3, "step_2"), ("export", 3, "step_3")):
        code = _reap(_start([sys.executable, str(driver), point, str(at)] + _cli(recipe)[3:], log))
        assert code == -signal.SIGKILL, log.read_text()[-2000:]
        assert _latest(run_dir) == survivor, f"after a kill at {point} {at}: latest={_latest(run_dir)!r}"
    # A half-written checkpoint from the 'save' kill was left as step_3.tmp and is never the latest.
    _kill_at_a_random_moment_of_the_last_step(recipe, run_dir, log, _step_seconds(base_dir))
    assert _reap(_start(_cli(recipe), log)) == 0, log.read_text()[-2000:]
    assert _rows(run_dir) == expected
    return expected


def _step_seconds(run_dir: Path) -> float:
    return _raw_rows(run_dir)[-1]["time/step"]


def _kill_at_a_random_moment_of_the_last_step(recipe: Path, run_dir: Path, log: Path, step_s: float) -> None:
    """An outside SIGKILL once step NUM_STEPS-1 is checkpointed, at a random moment within the last step's
    time in the uninterrupted run; the run must still be alive when the signal goes (otherwise the test
    would prove nothing) and must die of it."""
    before = f"step_{NUM_STEPS - 1}"
    proc = _start(_cli(recipe), log)
    deadline = time.time() + 300
    while _latest(run_dir) != before and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert _latest(run_dir) == before, log.read_text()[-2000:]
    time.sleep(random.uniform(0.0, 0.8 * step_s))
    assert proc.poll() is None, f"the run ended before the random kill (step {step_s:.2f} s)"
    proc.send_signal(signal.SIGKILL)
    assert _reap(proc, timeout=60) == -signal.SIGKILL


@pytest.mark.parametrize(("algorithm", "extra"), [("rlad", ""), ("gkd", ", gkd_top_k: 4")], ids=["rlad", "gkd"])
def test_random_kill_then_resume_reproduces_metrics_for_teacher_objectives(tmp_path, algorithm, extra):
    base_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    log = tmp_path / "log.txt"
    assert _reap(_start(_cli(_recipe(tmp_path, base_dir, algorithm, extra)), log)) == 0, log.read_text()[-2000:]
    expected = _rows(base_dir)
    recipe = _recipe(tmp_path, run_dir, algorithm, extra)
    _kill_at_a_random_moment_of_the_last_step(recipe, run_dir, log, _step_seconds(base_dir))
    assert _reap(_start(_cli(recipe), log)) == 0, log.read_text()[-2000:]
    assert _rows(run_dir) == expected
