"""Security and half-written-artifact guarantees that no package test covered.

- the package source never evaluates strings (eval/exec), never unpickles data (pickle/marshal loads,
  torch.load without weights_only=True, yaml.load; aliases, from-imports and getattr resolved) and never
  runs a shell (any shell= but a literal False); torch.distributed object collectives (which unpickle what
  other ranks of the job send) appear only in the files docs/reliability.md names;
- every server the package starts binds to 127.0.0.1 unless told otherwise (defaults, and a real
  `rlad serve` process checked in /proc/net/tcp);
- a half-written HF export (`step_N.tmp`), a dangling `latest` pointer or a checkpoint save in
  progress is never picked up, and a refused weight reload leaves the engine serving its previous
  weights and version;
- a model folder whose index names a missing shard is refused with the file's name (conversion read).
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import rlad_megatron
from rlad_megatron.tiny_models import save_tiny_model

PACKAGE = Path(rlad_megatron.__file__).parent
UNPICKLERS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("os", "system"),
}
# torch.distributed collectives that pickle Python objects (and unpickle what other ranks send).
OBJECT_COLLECTIVES = {"broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list"}
# Where the package does use them, between the ranks of one job (trusted peers); docs/reliability.md names
# each. A new one must be added here and there, on purpose.
OBJECT_COLLECTIVE_FILES = {"components.py", "backends/megatron/trainer.py", "backends/megatron/weight_export.py"}


def _imported_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted origin, for every import in the file (`import pickle as p`: p -> pickle;
    `from pickle import loads as l`: l -> pickle.loads)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str:
    """`a.b.c` of a call target with the first name resolved through the imports; `getattr(x, "y")` -> `x.y`."""
    if isinstance(node, ast.Name):
        return names.get(node.id, node.id)
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value, names)}.{node.attr}"
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "getattr"
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
    ):
        return f"{_dotted(node.args[0], names)}.{node.args[1].value}"
    return "?"


def _unsafe_calls(source: str) -> list[str]:
    """`line: problem` for every call that could run code taken from data (imports and aliases resolved)."""
    tree = ast.parse(source)
    names = _imported_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target, line = _dotted(node.func, names), node.lineno
        if target in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append(f"{line}: {target}()")
        if tuple(target.split(".")[-2:]) in UNPICKLERS and target.split(".")[0] in {m for m, _ in UNPICKLERS}:
            found.append(f"{line}: {target}()")
        if target == "torch.load":
            weights_only = [k for k in node.keywords if k.arg == "weights_only"]
            if not (
                weights_only and isinstance(weights_only[0].value, ast.Constant) and weights_only[0].value.value is True
            ):
                found.append(f"{line}: torch.load() without weights_only=True")
        for k in node.keywords:  # shell= anything but a literal False could run a shell
            if k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                found.append(f"{line}: shell={ast.unparse(k.value)}")
    return found


def _object_collectives(source: str) -> list[str]:
    tree = ast.parse(source)
    names = _imported_names(tree)
    calls = (_dotted(n.func, names) for n in ast.walk(tree) if isinstance(n, ast.Call))
    return [c for c in calls if c.split(".")[-1] in OBJECT_COLLECTIVES]


def test_the_scanner_catches_each_unsafe_pattern():
    bad = (
        "import pickle\nimport torch\nimport yaml\nimport subprocess\nimport os\n"
        "eval(cfg)\nexec(text)\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "yaml.load(s)\nsubprocess.run(cmd, shell=True)\nos.system(cmd)\n"
        # aliases, from-imports, getattr and a shell flag held in a variable
        "import pickle as pk\nfrom pickle import loads as undo\nfrom marshal import load\n"
        "pk.loads(b)\nundo(b)\nload(f)\ngetattr(pickle, 'loads')(b)\nsubprocess.Popen(cmd, shell=use_shell)\n"
    )
    assert len(_unsafe_calls(bad)) == 13, _unsafe_calls(bad)
    safe = (
        "import torch\nimport yaml\nimport re\nimport pickle\nimport subprocess\n"
        "torch.load(p, weights_only=True)\nmodel.eval()\nre.compile(x)\nyaml.safe_load(s)\n"
        "pickle.dump(obj, f)\nsubprocess.run(cmd, shell=False)\nloads(b)\n"
    )
    assert _unsafe_calls(safe) == []
    collectives = "import torch.distributed as dist\nfrom torch.distributed import all_gather_object as ago\n"
    collectives += "dist.broadcast_object_list(x)\nago(out, x)\ndist.broadcast(t)\n"
    assert _object_collectives(collectives) == [
        "torch.distributed.broadcast_object_list",
        "torch.distributed.all_gather_object",
    ]


def test_package_never_evaluates_or_unpickles_data():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the scan really walked the package
    problems = [f"{path.relative_to(PACKAGE)}:{hit}" for path in files for hit in _unsafe_calls(path.read_text())]
    assert problems == [], "unsafe calls in the package:\n" + "\n".join(problems)


def test_object_collectives_only_where_the_docs_say():
    """Object collectives unpickle what other ranks of the same job send: allowed only in the files
    docs/reliability.md lists."""
    files = sorted(PACKAGE.rglob("*.py"))
    using = {str(path.relative_to(PACKAGE)) for path in files if _object_collectives(path.read_text())}
    assert using == OBJECT_COLLECTIVE_FILES
    docs = (PACKAGE.parent / "docs" / "reliability.md").read_text()
    assert all(f"`{name}`" in docs for name in OBJECT_COLLECTIVE_FILES)


def test_every_server_defaults_to_loopback():
    import argparse

    from rlad_megatron.config import RolloutConfig, TeacherConfig
    from rlad_megatron.engines import fleet, server, sglang_fleet

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    assert parser.parse_args(["--model", "m"]).host == "127.0.0.1"
    assert RolloutConfig().host == TeacherConfig().host == "127.0.0.1"
    for fn in (fleet.embedded_server_cmd, fleet.launch_router, sglang_fleet.SGLangFleet.__init__):
        assert inspect.signature(fn).parameters["host"].default == "127.0.0.1", fn
    cmd = sglang_fleet.sglang_server_cmd("m", 30000, "127.0.0.1", {}, 0, api_key="k")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--api-key") + 1] == "k"


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_rlad_serve_listens_on_loopback_only(tmp_path):
    model = save_tiny_model(tmp_path / "m", "llama", seed=0, max_position_embeddings=32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "RLAD_API_KEY"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlad_megatron.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-batch-size",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not _listening_addresses(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        addresses = _listening_addresses(port)
        assert addresses, (
            f"server never listened: {proc.poll()} {proc.stdout.read() if proc.poll() is not None else ''}"
        )
        assert addresses == {"0100007F"}, addresses  # 127.0.0.1 only, not 0.0.0.0 or ::
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- half-written artifacts
def test_checkpoint_save_in_progress_or_dangling_pointer_is_never_loaded(tmp_path):
    from rlad_megatron.backends.megatron.checkpoint import (
        checkpoint_root,
        latest_checkpoint,
    )

    root = checkpoint_root(tmp_path)
    (root / "step_2.tmp").mkdir(parents=True)  # killed during the first save
    assert latest_checkpoint(tmp_path) is None
    (root / "step_1").mkdir()
    (root / "latest").write_text("step_1\n")
    (root / "step_3.tmp").mkdir()  # killed during a later save: `latest` still names step_1
    assert latest_checkpoint(tmp_path) == root / "step_1"
    for bad in ("step_3.tmp", "step_4", "../elsewhere"):
        (root / "latest").write_text(bad + "\n")
        with pytest.raises(RuntimeError, match="not a complete checkpoint folder"):
            latest_checkpoint(tmp_path)


def test_export_pointer_to_a_missing_or_unfinished_folder_is_refused(tmp_path):
    from rlad_megatron.conversion.hf_io import resolve_latest

    (tmp_path / "step_1").mkdir()
    (tmp_path / "step_2.tmp").mkdir()
    (tmp_path / "latest").write_text("step_1\n")
    assert resolve_latest(tmp_path) == tmp_path / "step_1"
    for bad in ("step_2.tmp", "step_5", "../step_1", ""):
        (tmp_path / "latest").write_text(bad + "\n")
        with pytest.raises(FileNotFoundError, match="not a complete step_N export folder"):
            resolve_latest(tmp_path)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from rlad_megatron.engines.embedded import EmbeddedEngine

    root = tmp_path_factory.mktemp("exports")
    base = save_tiny_model(root / "base", "llama", seed=1, max_position_embeddings=32)
    save_tiny_model(root / "next", "llama", seed=2, max_position_embeddings=32)
    return root, EmbeddedEngine(str(base), max_batch_size=2)


def _greedy_logprobs(engine) -> list[float]:
    from rlad_megatron.engines.base import SamplingParams

    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=4, ignore_eos=True))
    return out[0][0].logprobs


def test_refused_reloads_keep_serving_the_previous_weights(served):
    root, engine = served
    before, version = _greedy_logprobs(engine), engine.version
    unfinished = root / "step_7.tmp"  # a complete-looking copy that was never published
    shutil.copytree(root / "next", unfinished, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="still being written"):
        engine.update_weights(path=str(unfinished), version=7)
    torn = root / "step_8"  # index names a shard the copy never reached
    shutil.copytree(root / "next", torn, dirs_exist_ok=True)
    (torn / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.norm.weight": "model.safetensors",
                    "lm_head.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        engine.update_weights(path=str(torn), version=8)
    assert engine.version == version and _greedy_logprobs(engine) == before
    engine.update_weights(path=str(root / "next"), version=9)  # a complete folder still loads
    assert engine.version == 9 and _greedy_logprobs(engine) != before


def test_conversion_reader_names_the_missing_shard(served):
    from rlad_megatron.conversion.hf_io import HFReader

    root, _ = served
    folder = root / "sharded"
    shutil.copytree(root / "base", folder, dirs_exist_ok=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "model.norm.weight": "model.safetensors",
                    "lm_head.weight": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    with pytest.raises(FileNotFoundError, match=r"missing: \['model-00002-of-00002.safetensors'\]"):
        HFReader(folder)


# ----------------------------------------------------------------------------- teacher log-probs
@pytest.mark.parametrize("name", ["rlad", "kdrl", "gkd"])
def test_teacher_losses_refuse_a_batch_without_teacher_scores(name):
    """Scoring failed or was skipped: the loss raises instead of training on the student alone."""
    import torch

    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.config import AlgorithmConfig

    objective = build_objective(AlgorithmConfig(name=name))
    teacher_keys = [k for k in objective.required_batch_keys if k.startswith("teacher")]
    assert objective.needs_teacher and teacher_keys
    batch = {k: torch.zeros(4) for k in objective.required_batch_keys if k not in teacher_keys}
    with pytest.raises(ValueError, match=rf"algorithm '{name}' needs batch keys \['{teacher_keys[0]}'"):
        objective.loss(batch, num_tokens=4, num_seqs=1)


@pytest.mark.parametrize("name", ["opd"])
def test_teacher_advantages_refuse_missing_teacher_scores(name):
    """OPD puts the teacher into the advantages: missing scores raise there, not in the loss."""
    import torch

    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.config import AlgorithmConfig

    objective = build_objective(AlgorithmConfig(name=name, group_size=2))
    olds = [torch.zeros(2), torch.zeros(3)]
    with pytest.raises(ValueError, match="teacher_logprobs is needed"):
        objective.token_advantages(
            torch.tensor([0.0, 1.0]), 2, seq_lens=[2, 3], old_logprobs=olds, teacher_logprobs=None
        )
    ok = objective.token_advantages(
        torch.tensor([0.0, 1.0]),
        2,
        seq_lens=[2, 3],
        old_logprobs=olds,
        teacher_logprobs=[torch.full((2,), -1.0), torch.full((3,), -1.0)],
    )
    assert [a.shape[0] for a in ok] == [2, 3]
