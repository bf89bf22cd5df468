"""Fleets the trainer launches itself: which Python runs SGLang, and which GPUs each fleet gets.

Fake interpreters stand in for SGLang's venv: shell scripts that succeed (sglang importable) or fail like a
python without it. CUDA and the GPU count are faked where the rule depends on them.
"""

from __future__ import annotations

import pytest
import torch

import rlad_megatron.engines as rollout_pkg
from rlad_megatron.config import RolloutConfig, TeacherConfig, load_config
from rlad_megatron.engines import factory, sglang_fleet
from rlad_megatron.engines.factory import build_engine, fleet_gpu_offsets, resolve_kind, sglang_python


def interpreter(tmp_path, name: str, has_sglang: bool) -> str:
    exe = tmp_path / name
    body = "exit 0" if has_sglang else "echo \"ModuleNotFoundError: No module named 'sglang'\" >&2; exit 1"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(0o755)
    return str(exe)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # build_engine only checks that it is there
    return str(tmp_path / "model")


def test_sglang_python_is_the_setting_then_the_environment_then_python(monkeypatch):
    monkeypatch.delenv("RLAD_SGLANG_PYTHON", raising=False)
    assert sglang_python(RolloutConfig()) == "python"
    monkeypatch.setenv("RLAD_SGLANG_PYTHON", "/opt/sglang/bin/python")
    assert sglang_python(TeacherConfig()) == "/opt/sglang/bin/python"
    assert sglang_python(TeacherConfig(sglang_python="/venv/bin/python")) == "/venv/bin/python"


def test_auto_picks_sglang_only_with_cuda_and_an_interpreter_that_imports_it(tmp_path, monkeypatch):
    good, bad = interpreter(tmp_path, "good", True), interpreter(tmp_path, "bad", False)
    monkeypatch.setattr(factory, "_cuda", lambda: False)
    assert resolve_kind(RolloutConfig(sglang_python=good)) == "embedded"  # CPU: always the embedded engine
    monkeypatch.setattr(factory, "_cuda", lambda: True)
    assert resolve_kind(RolloutConfig(sglang_python=good)) == "sglang"
    for python in (bad, str(tmp_path / "missing")):
        with pytest.warns(UserWarning, match="rollout.sglang_python or RLAD_SGLANG_PYTHON"):
            assert resolve_kind(RolloutConfig(sglang_python=python)) == "embedded"


def test_kind_sglang_without_sglang_fails_at_build_time_naming_the_setting(tmp_path, model_dir):
    for python in (str(tmp_path / "missing"), interpreter(tmp_path, "bad", False)):
        with pytest.raises(RuntimeError, match=r"teacher.sglang_python or RLAD_SGLANG_PYTHON") as err:
            build_engine(
                TeacherConfig(kind="sglang", sglang_python=python), model_dir, "teacher", str(tmp_path / "logs")
            )
        assert python in str(err.value)


def test_kind_sglang_starts_its_servers_with_that_interpreter_on_its_gpus(tmp_path, model_dir, monkeypatch):
    good, started = interpreter(tmp_path, "good", True), []

    def capture(cmds, *args, **kwargs):
        started.extend(cmds)
        raise KeyboardInterrupt  # stop before anything would be launched

    monkeypatch.setattr(sglang_fleet, "launch_fleet", capture)
    cfg = RolloutConfig(kind="sglang", sglang_python=good, num_servers=2, server_args={"tp": 2})
    with pytest.raises(KeyboardInterrupt):
        build_engine(cfg, model_dir, "rollout", str(tmp_path / "logs"), gpu_offset=3)
    assert [c[0] for c in started] == [good, good]
    assert [c[c.index("--base-gpu-id") + 1] for c in started] == ["3", "5"]
    assert all(c[c.index("--tp-size") + 1] == "2" for c in started)


def gpu_sets(offsets: dict[str, int], engines: dict[str, object], trainer_gpus: int) -> dict[str, set[int]]:
    sets = {"trainer": set(range(trainer_gpus))}
    for role, cfg in engines.items():
        sets[role] = set(range(offsets[role], offsets[role] + factory.fleet_gpus(cfg)))
    return sets


def test_fleets_go_after_the_trainers_gpus_teacher_first():
    engines = {
        "rollout": RolloutConfig(kind="sglang", num_servers=2, server_args={"tp": 1}),
        "teacher": TeacherConfig(kind="sglang", server_args={"tp_size": 4}),
    }
    offsets = fleet_gpu_offsets(engines, trainer_gpus=2, device_count=8)
    assert offsets == {"teacher": 2, "rollout": 6}
    sets = gpu_sets(offsets, engines, 2)
    assert sets == {"trainer": {0, 1}, "teacher": {2, 3, 4, 5}, "rollout": {6, 7}}


def test_too_few_gpus_is_refused_with_the_sizes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    engines = {
        "rollout": RolloutConfig(kind="sglang", num_servers=2),
        "teacher": TeacherConfig(kind="sglang", server_args={"tp_size": 4}),
    }
    with pytest.raises(ValueError, match=r"has 8 GPU.*3 local rank\(s\) \(LOCAL_WORLD_SIZE\).*teacher 4 \+ rollout 2"):
        fleet_gpu_offsets(engines, device_count=8)


def test_fleets_not_launched_here_take_no_gpu():
    engines = {"rollout": RolloutConfig(kind="embedded"), "teacher": TeacherConfig(kind="http", urls=["http://x:1"])}
    assert fleet_gpu_offsets(engines) == {"rollout": 0, "teacher": 0}  # no device count asked on this CPU box


def _build_on_8_gpus(tmp_path, monkeypatch, overrides: list[str]):
    """(a builder of the run's source context, {fleet log dir or role: first GPU} it filled) for `overrides`
    (`<model>`: a tiny model), with fake engines on an 8-GPU node whose first 4 GPUs are the trainer's ranks."""
    from rlad_megatron import components
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.tiny_models import save_tiny_model
    from rlad_megatron.train import sample_source

    save_tiny_model(tmp_path / "m", "qwen3")
    base = [f"model.student={tmp_path / 'm'}", "data.train=task:addition", "data.task_kwargs={size: 16}"]
    cfg = load_config(None, base + [o.replace("<model>", str(tmp_path / "m")) for o in overrides])
    built = {}

    def build(engine_cfg, model, role, gpu_offset=0, log_dir="", record_routes=False):
        built[log_dir or role] = gpu_offset
        return object()

    monkeypatch.setattr(rollout_pkg, "build_engine", build)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")

    def context():
        return components.build_source_context(
            cfg, build_objective(cfg.algorithm), sample_source(cfg), with_engines=True
        )

    return context, built


def test_the_training_context_builds_its_fleets_on_disjoint_gpus(tmp_path, monkeypatch):
    context, built = _build_on_8_gpus(
        tmp_path,
        monkeypatch,
        [
            "model.teacher=<model>",
            "rollout.kind=sglang",
            "rollout.num_servers=2",
            "teacher.kind=sglang",
            "teacher.server_args={tp_size: 2}",
        ],
    )
    context()
    assert built == {"teacher": 4, "rollout": 6}  # trainer 0-3, teacher 4-5, rollout 6-7


def test_several_teacher_fleets_get_disjoint_gpus_in_config_order(tmp_path, monkeypatch):
    context, built = _build_on_8_gpus(
        tmp_path,
        monkeypatch,
        [
            "teachers.math.model=<model>",
            "teachers.math.kind=sglang",
            "teachers.math.server_args={tp_size: 2}",
            "teachers.code.model=<model>",
            "teachers.code.kind=sglang",
            "data.teacher_field=domain",
            "data.teacher_default=code",
            "rollout.kind=sglang",
        ],
    )
    ctx = context()
    # trainer 0-3, math 4-5, code 6, rollout 7
    assert built == {"logs/teacher_math_fleet": 4, "logs/teacher_code_fleet": 6, "rollout": 7}
    assert sorted(ctx.teacher_engines) == ["code", "math"] and ctx.teacher_engine is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 7)
    with pytest.raises(ValueError, match=r"teachers.math 2 \+ teachers.code 1 \+ rollout 1"):
        context()
