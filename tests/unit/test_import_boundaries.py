"""Dependency direction: the pure packages never pull in Megatron, SGLang or Transformer Engine,
and the algorithm code stays free of host syncs and torch.distributed."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("megatron", "sglang", "transformer_engine")
PURE = (
    "rlad_megatron.algorithms",
    "rlad_megatron.config",
    "rlad_megatron.types",
    "rlad_megatron.engines",
    "rlad_megatron.teacher",
)


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_not_import_heavy_packages(module):
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], f"{module} imported heavy packages"


def _algorithm_sources():
    files = sorted((ROOT / "rlad_megatron" / "algorithms").glob("*.py"))
    assert files, "rlad_megatron/algorithms has no modules"
    return files


def test_algorithms_import_only_stdlib_and_torch():
    allowed = {"__future__", "collections", "dataclasses", "math", "typing", "torch", "numpy"}
    for path in _algorithm_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"
            assert not any(alias.name.startswith("torch.distributed") for alias in getattr(node, "names", []))


def test_algorithms_have_no_host_syncs_or_collectives():
    for path in _algorithm_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("item", "distributed"), f"{path.name}:{node.lineno} uses .{node.attr}"


def _imported_roots(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_only_the_megatron_backend_imports_megatron_or_transformer_engine():
    package = ROOT / "rlad_megatron"
    backend = package / "backends" / "megatron"
    offenders = sorted(
        str(path.relative_to(ROOT))
        for path in package.rglob("*.py")
        if backend not in path.parents and {"megatron", "transformer_engine"} & set(_imported_roots(path))
    )
    assert offenders == [], f"only rlad_megatron/backends/megatron may import Megatron / TE: {offenders}"
