"""The docs name code as it is: every `file.py:name` / `file.py::name` reference in README.md and docs/
points at a file of this repository that defines `name` (a function, class, method `Class.name`, or a
test). Paths may be given from the repository root, from the package (`train.py`, `engines/fleet.py`) or
from a test folder; references into other projects (SGLang, Megatron, transformers) are left alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`([A-Za-z0-9_./-]+\.py):{1,2}([A-Za-z_][A-Za-z0-9_.]*)")
SEARCH_ROOTS = ("", "rlad_megatron", "tests/unit", "tests/integration", "tests/distributed", "tests/gpu", "bench")
OTHER_PROJECTS = (
    "sglang",
    "python/sglang",
    "srt",
    "megatron",
    "transformers",
    "torch",
    "transformer_engine",
    "nemo_run",
)


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _resolve(path: str) -> Path | None:
    for root in SEARCH_ROOTS:
        candidate = REPO / root / path
        if candidate.is_file():
            return candidate
    return None


def _defined_names(source: str) -> set[str]:
    """Top-level functions and classes, and `Class.method` for their methods."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
        if isinstance(node, (ast.Assign, ast.AnnAssign)):  # module constants
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def _broken_references(documents: list[Path]) -> list[str]:
    broken = []
    for doc in documents:
        for number, line in enumerate(doc.read_text().splitlines(), start=1):
            for path, name in REFERENCE.findall(line):
                name = name.rstrip(".")
                where = f"{doc.name}:{number}: {path}:{name}"
                if path.startswith(OTHER_PROJECTS):
                    continue
                target = _resolve(path)
                if target is None:
                    broken.append(f"{where} (no such file)")
                elif name not in _defined_names(target.read_text()):
                    broken.append(f"{where} (not defined there)")
    return broken


def test_every_code_reference_in_the_docs_exists():
    documents = _documents()
    references = sum(len(REFERENCE.findall(d.read_text())) for d in documents)
    assert references > 40  # the pattern really finds the docs' references
    assert _broken_references(documents) == []


def test_a_stale_reference_is_reported(tmp_path):
    doc = tmp_path / "stale.md"
    doc.write_text("See `train.py:no_such_function` and `train.py:collect` and `gone.py:f`.\n")
    found = _broken_references([doc])
    assert [f.split(": ", 1)[1] for f in found] == [
        "train.py:no_such_function (not defined there)",
        "gone.py:f (no such file)",
    ]
