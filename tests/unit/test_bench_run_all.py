"""bench/run_all.py: running bench scripts as subprocesses and assembling docs/benchmarks.md from their output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run_all

INFO = {"cores": "2", "cpu": "Test CPU", "torch": "2.x", "python": "3.11"}


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "__init__.py").write_text("")  # the scripts run as modules of this package
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(run_all, "REPO", tmp_path)
    monkeypatch.setattr(run_all, "DOC", tmp_path / "docs" / "benchmarks.md")
    return tmp_path


def _script(repo: Path, name: str, body: str) -> run_all.Bench:
    (repo / "bench" / name).write_text(body)
    return run_all.Bench(name[:-3], f"bench/{name}", f"Title {name}", "the baseline", ("--n", "1"))


def test_json_table_ratio_lines_and_command(fake_repo):
    bench = _script(
        fake_repo,
        "b_json.py",
        (
            "import argparse, json\np = argparse.ArgumentParser(); p.add_argument('--n'); p.add_argument('--json')\n"
            "a = p.parse_args()\nprint('speed-up : 2.50x (target >= 2x)')\nprint('noise line')\n"
            "open(a.json, 'w').write(json.dumps({'table': ['| a | b |', '|---|---|', '| 1 | 2 |']}))\n"
        ),
    )
    result = run_all.run_bench(bench, quick=False, timeout=60)
    assert result["status"] == 0 and result["json"]["table"][2] == "| 1 | 2 |"
    text = "\n".join(run_all.section(bench, result, INFO))
    assert "Command: `OMP_NUM_THREADS=2 .venv/bin/python -m bench.b_json --n 1`" in text
    assert "| 1 | 2 |" in text and "- speed-up : 2.50x (target >= 2x)" in text and "- noise line" not in text
    assert "2 cores, Test CPU, torch 2.x" in text


def test_script_own_section_is_kept_and_doc_rebuilt(fake_repo):
    bench = _script(
        fake_repo,
        "b_own.py",
        (
            "import pathlib\np = pathlib.Path('docs/benchmarks.md')\n"
            "p.write_text((p.read_text() if p.exists() else '') + '\\n### Own numbers\\n| x | 3.0x |\\n')\n"
        ),
    )
    run_all.DOC.write_text("# old file\n")
    result = run_all.run_bench(bench, quick=False, timeout=60)
    assert result["own_section"].startswith("### Own numbers")
    assert run_all.DOC.read_text() == "# old file\n"  # the script's append is taken back; run_all reassembles
    doc = run_all.assemble([(bench, result)], INFO, ["--only", "b_own"], with_comparison=False)
    assert "### Own numbers" in doc and "| Title b_own.py | `bench/b_own.py` | ok |" in doc


def test_missing_and_failing_scripts_are_reported(fake_repo):
    missing = run_all.Bench("gone", "bench/gone.py", "Gone", "none")
    failing = _script(fake_repo, "b_fail.py", "import sys\nprint('partial')\nsys.exit('boom: bad input')\n")
    results = [(missing, run_all.run_bench(missing, False, 60)), (failing, run_all.run_bench(failing, False, 60))]
    doc = run_all.assemble(results, INFO, [], with_comparison=False)
    assert "| Gone | `bench/gone.py` | missing | - |" in doc and "is not in this checkout" in doc
    assert "failed (1)" in doc and "boom: bad input" in doc


def test_timeout_is_reported_not_raised(fake_repo):
    bench = _script(fake_repo, "b_slow.py", "import time\ntime.sleep(30)\n")
    result = run_all.run_bench(bench, quick=False, timeout=1)
    assert result["status"] == "timeout" and "killed after 1 s" in result["stderr"]


def test_main_writes_doc_for_selected_benchmarks(fake_repo, monkeypatch):
    bench = _script(fake_repo, "b_ok.py", "print('ratio 1.10x vs baseline')\n")
    monkeypatch.setattr(run_all, "BENCHES", (bench,))
    monkeypatch.setattr(run_all, "machine", lambda: INFO)
    assert run_all.main(["--only", "b_ok"]) == 0
    text = run_all.DOC.read_text()
    assert text.startswith("# Benchmarks") and "- ratio 1.10x vs baseline" in text
    assert json.dumps(INFO["cpu"])[1:-1] in text


def test_hand_written_sections_are_kept_and_generated_blocks_replaced(fake_repo):
    bench = _script(fake_repo, "b_tr.py", "print('ratio 1.03x')\n")
    bench = run_all.Bench("trainer", bench.script, "Trainer: X vs Y", "Y", match=("trainer",))
    begin, end = run_all._markers("trainer")
    previous = (
        "# Benchmarks\n\nold intro\n\n## Trainer\n\nHand-written table | 1.03 |\n\n"
        f"{begin}\nOLD GENERATED\n{end}\n\n## Notes from someone\n\nkeep me\n"
    )
    result = run_all.run_bench(bench, quick=False, timeout=60)
    doc = run_all.assemble([(bench, result)], INFO, [], False, previous)
    assert doc.count("## Trainer") == 1 and "Hand-written table | 1.03 |" in doc
    assert "OLD GENERATED" not in doc and "- ratio 1.03x" in doc and "old intro" not in doc
    assert doc.index("Hand-written table") < doc.index(begin) < doc.index("- ratio 1.03x") < doc.index(end)
    assert "## Notes from someone\n\nkeep me" in doc
    again = run_all.assemble([(bench, result)], INFO, [], False, doc)  # idempotent on its own output
    assert again.count("- ratio 1.03x") == 1 and again.count("Hand-written table") == 1


def test_only_keeps_sections_of_benchmarks_not_rerun_in_place(fake_repo):
    first = run_all.Bench("first", "bench/first.py", "First", "x", match=("first",))
    second = _script(fake_repo, "b_second.py", "print('ratio 2.00x')\n")
    second = run_all.Bench("second", second.script, "Second", "y", match=("second",))
    previous = "# B\n\n## First\n\nfirst text, measured earlier\n\n## Second\n\nsecond hand text\n"
    doc = run_all.assemble(
        [(second, run_all.run_bench(second, False, 60))],
        INFO,
        ["--only", "second"],
        False,
        previous,
        benches=[first, second],
    )
    assert doc.index("## First") < doc.index("## Second") and "first text, measured earlier" in doc
    assert "| First | `bench/first.py` | kept from an earlier run | - |" in doc and "- ratio 2.00x" in doc
