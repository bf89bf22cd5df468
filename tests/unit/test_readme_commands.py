"""The README's `rlad plan` and `rlad render` lines run as written.

They are read from the README's "Everyday commands" block, so changing a line there to one that fails breaks
this test. Each runs in a scratch folder whose `examples/` is the repository's, so relative paths resolve as
they do from the repository root and `--out` files land in the scratch folder.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def everyday_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"Everyday commands.*?```bash\n(.*?)```", text, re.DOTALL)
    assert block, "README.md has no 'Everyday commands' bash block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def readme_line(subcommand: str) -> list[str]:
    lines = [line for line in everyday_commands() if line.startswith(f"rlad {subcommand} ")]
    assert len(lines) == 1, f"expected one `rlad {subcommand}` line in the README, found {lines}"
    return shlex.split(lines[0])


def run_rlad(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "rlad"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlad_megatron.cli", *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


def test_readme_plan_line_runs(workdir):
    argv = readme_line("plan")
    result = run_rlad(argv, workdir)
    assert result.returncode == 0, result.stderr
    if "--nodes" in argv:
        nodes = argv[argv.index("--nodes") + 1]
        assert result.stdout.startswith(f"topology: {nodes} node(s)")
    assert "estimated step time" in result.stdout


def test_readme_render_line_runs_and_the_script_dry_runs(workdir):
    argv = readme_line("render")
    result = run_rlad(argv, workdir)
    assert result.returncode == 0, result.stderr
    script = workdir / argv[argv.index("--out") + 1]
    assert script.is_file()
    dry = subprocess.run(
        ["bash", str(script)],
        cwd=workdir,
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "topology:" in dry.stdout + dry.stderr


def test_plan_nodes_flag_resets_only_the_role_counts_not_given():
    from rlad_megatron.config import load_config
    from rlad_megatron.launch.plan import add_arguments, flag_overrides
    from rlad_megatron.launch.topology import plan_topology

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    recipe = str(REPO / "examples/qwen3_math/recipe.yaml")  # launch: 8 nodes = 4 trainer + 2 rollout + 2 teacher
    args = parser.parse_args([recipe, "launch.teacher_nodes=2", "--nodes", "5"])
    cfg = load_config(recipe, args.overrides + flag_overrides(args, args.overrides))
    assert (cfg.launch.nodes, cfg.launch.teacher_nodes, cfg.launch.trainer_nodes, cfg.launch.rollout_nodes) == (
        5,
        2,
        0,
        0,
    )
    topo = plan_topology(cfg)
    assert len(topo.fleet("teacher")) == 2 and len(topo.trainer_nodes) == 2  # the rest split automatically
