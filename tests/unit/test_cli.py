"""The `rlad` console script: help works for every subcommand, missing modules fail in one clear line,
real import errors are not hidden, and dispatch reaches the module's `run`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlad_megatron import cli

ROOT = Path(__file__).resolve().parents[2]
RLAD = Path(sys.executable).with_name("rlad")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(args):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT, env=ENV, check=False)


def test_rlad_help_lists_every_subcommand():
    exe = [str(RLAD)] if RLAD.exists() else [sys.executable, "-m", "rlad_megatron.cli"]
    out = run([*exe, "--help"])
    assert out.returncode == 0, out.stderr
    for name in cli.COMMANDS:
        assert name in out.stdout


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_each_subcommand_help_exits_zero(command):
    out = run([sys.executable, "-m", "rlad_megatron.cli", command, "--help"])
    assert out.returncode == 0, out.stderr
    assert f"rlad {command}" in out.stdout


@pytest.fixture
def argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["rlad"])  # cli.main rewrites sys.argv; restore it afterwards


def test_import_errors_inside_an_existing_module_are_not_hidden(monkeypatch, tmp_path, argv):
    (tmp_path / "rlad_test_broken_cmd.py").write_text("import rlad_surely_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "broken", ("rlad_test_broken_cmd", "broken"))
    with pytest.raises(ModuleNotFoundError, match="rlad_surely_missing_dependency"):
        cli.main(["broken"])


def test_dispatch_reaches_the_module(monkeypatch, tmp_path, argv):
    (tmp_path / "rlad_test_echo_cmd.py").write_text(
        "def add_arguments(parser):\n    parser.add_argument('--times', type=int, default=1)\n"
        "def run(args):\n    return 40 + args.times\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "echo", ("rlad_test_echo_cmd", "echo"))
    assert cli.main(["echo", "--times", "2"]) == 42


def test_no_command_prints_help_and_fails(capsys, argv):
    assert cli.main([]) != 0
    assert "COMMAND" in capsys.readouterr().out


def test_overrides_may_follow_options(monkeypatch, tmp_path, argv, capsys):
    (tmp_path / "rlad_test_over_cmd.py").write_text(
        "def add_arguments(p):\n"
        "    p.add_argument('--config')\n"
        "    p.add_argument('overrides', nargs='*')\n"
        "    p.add_argument('--flag', action='store_true')\n"
        "def run(args):\n"
        "    print('OVERRIDES', args.overrides, args.flag)\n"
        "    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "over", ("rlad_test_over_cmd", "over"))
    assert cli.main(["over", "--config", "r.yaml", "a.b=1", "--flag", "c.d=2"]) == 0
    assert "OVERRIDES ['a.b=1', 'c.d=2'] True" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["over", "--config", "r.yaml", "--bogus"])
