"""examples/nemo_run: LocalExecutor runs real CPU jobs; SlurmExecutor renders its sbatch without a cluster."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from rlad_megatron.config import load_config
from rlad_megatron.launch.plan import make_plan

pytest.importorskip("nemo_run", reason="nemo-run is in the [launch] extra: pip install -e '.[launch]'")

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "tests/data/launch_qwen3_8b_32b.yaml")
DEMO = REPO / "examples/cpu_demo/run_demo.py"


@pytest.fixture(scope="module")
def launcher(tmp_path_factory):
    import nemo_run.config

    nemo_run.config.set_nemorun_home(str(tmp_path_factory.mktemp("nemorun_home")))
    spec = importlib.util.spec_from_file_location("nemo_run_launch", REPO / "examples/nemo_run/launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def venv_python_on_path(monkeypatch):
    # LocalExecutor runs `python` from PATH; make it this interpreter's environment.
    monkeypatch.setenv("PATH", f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def test_slurm_executor_renders_sbatch_without_a_cluster(launcher, tmp_path, monkeypatch):
    cfg = load_config(RECIPE, ["launch.nodes=4"])
    # nemo-run runs local shell commands through `invoke`, which reads stdin; pytest's stdin refuses reads.
    with open(os.devnull) as devnull:
        monkeypatch.setattr("sys.stdin", devnull)
        text = launcher.sbatch_text(cfg, RECIPE, ["launch.nodes=4"], str(tmp_path))
    header = {line for line in text.splitlines() if line.startswith("#SBATCH")}
    for expected in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--time=12:00:00",
        "--partition=gpu",
        "--account=myproj",
        "--signal=USR1@120",
        "--exclusive",
    ):
        assert f"#SBATCH {expected}" in header
    assert "--container-image nvcr.io/myorg/rlad-megatron:0.1.0" in text
    assert "python -m rlad_megatron.launch.node launch_qwen3_8b_32b.yaml launch.nodes=4" in text
    assert "export NCCL_IB_HCA=mlx5_0,mlx5_1" in text


def test_slurm_job_finds_the_recipe_in_its_code_folder(launcher, tmp_path, monkeypatch):
    """The job runs in nemo-run's code folder, not in this checkout: the recipe it is given must be there."""
    cfg = load_config(RECIPE)
    with open(os.devnull) as devnull:
        monkeypatch.setattr("sys.stdin", devnull)
        text = launcher.sbatch_text(cfg, RECIPE, [], str(tmp_path / "jobs"))
    srun = next(line for line in text.splitlines() if line.startswith("srun ") and "rlad_megatron.launch.node" in line)
    args = srun.split()
    job_recipe = args[args.index("rlad_megatron.launch.node") + 1]
    assert not Path(job_recipe).is_absolute()
    assert args[args.index("--container-workdir") + 1] == "/nemo_run/code"
    mounts = dict(m.split(":")[::-1] for m in args[args.index("--container-mounts") + 1].split(","))
    assert (Path(mounts["/nemo_run"]) / "code" / job_recipe).read_text() == Path(RECIPE).read_text()


def test_git_package_ships_the_recipe_next_to_the_commit(launcher):
    packager, job_recipe = launcher.recipe_packager(RECIPE, git_package=True)
    assert type(packager).__name__ == "GitArchivePackager" and job_recipe == Path(RECIPE).name
    assert packager.include_pattern == RECIPE and packager.include_pattern_relative_path == str(Path(RECIPE).parent)


def test_local_executor_runs_rlad_plan(launcher, tmp_path, venv_python_on_path):
    out = tmp_path / "plan.json"
    launcher.run_local("rlad-plan", launcher.plan_script(RECIPE, 4, str(out)))
    plan = json.loads(out.read_text())
    expected = make_plan(load_config(RECIPE, ["launch.nodes=4"]))
    assert plan["seconds"] == pytest.approx(expected["seconds"])
    assert plan["topology"] == expected["topology"]


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.is_file(), reason=f"{DEMO.relative_to(REPO)} does not exist yet (CPU demo not landed)")
def test_local_executor_runs_the_cpu_demo_in_smoke_size(launcher, tmp_path, venv_python_on_path):
    done = tmp_path / "demo.ok"
    launcher.run_local("rlad-demo", launcher.demo_script(smoke=True, done_file=str(done)))
    assert done.read_text().strip() == "ok", "the CPU demo did not exit 0 under LocalExecutor (see nemo-run logs)"
