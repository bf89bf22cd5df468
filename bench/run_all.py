"""Run every benchmark and write docs/benchmarks.md (`make bench`).

Each bench script runs as a subprocess with OMP_NUM_THREADS=2 and must print its own baseline
ratio (measured in the same run). Its section in docs/benchmarks.md is rebuilt from what it
produced: the JSON it writes when the script accepts `--json PATH` (then its `table` lines), or
else its standard output verbatim; a script that appends its own section to docs/benchmarks.md
while it runs has that section kept as written. Every section states the exact command, the
machine (cores, CPU model, torch version) and the wall time. The method comparison is too long
for `make bench`; its summary is linked (bench/compare_methods.py, docs/method_comparison.md),
or run with `--with-comparison`.

  .venv/bin/python -m bench.run_all [--only engine step_time] [--quick] [--with-comparison]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    title: str
    baseline: str
    args: tuple[str, ...] = ()
    quick_args: tuple[str, ...] = ()
    match: tuple[str, ...] = ()
    """Lower-case words; an existing `## ` section whose heading contains one is this bench's section."""
    threads: str = "2"
    """OMP_NUM_THREADS of the script (1 for tiny-model loops: a second thread only adds contention)."""

    @property
    def module(self) -> str:
        """`bench/bench_x.py` -> `bench.bench_x`: every bench runs as a module from the repository root."""
        return self.script.removesuffix(".py").replace("/", ".")


BENCHES = (
    Bench(
        "trainer",
        "bench/bench_trainer.py",
        "Trainer: Megatron backend vs Hugging Face + AdamW",
        "HF model + torch.optim.AdamW on the same samples, unpadded (one sample at a time) and padded",
        match=("trainer",),
    ),
    Bench(
        "engine",
        "bench/bench_engine.py",
        "Embedded engine vs transformers generate / forward",
        "transformers `generate` (KV cache) and a plain forward for scoring",
        match=("engine",),
        threads="1",  # the headline is process CPU time at one thread (see the script's docstring)
    ),
    Bench(
        "weight_sync",
        "bench/bench_weight_sync.py",
        "Weight export vs raw safetensors write",
        "safetensors `save_file` of the same tensors",
        match=("weight",),
    ),
    Bench(
        "sync_wire",
        "bench/bench_sync_wire.py",
        "Weight sync into servers: over the wire vs through disk",
        "the disk path (`rollout.sync=disk`) in the same run, alternating",
        ("--repeats", "2"),
        ("--repeats", "1"),
        match=("over the wire",),
        threads="1",
    ),
    Bench(
        "step_time",
        "bench/bench_step_time.py",
        "RLAD vs GRPO: time per step by phase",
        "GRPO with the same config, interleaved in the same run",
        ("--steps", "6", "--repeats", "2", "--plot", "docs/img/step_time_phases.png"),
        ("--steps", "3", "--repeats", "1", "--plot", "docs/img/step_time_phases.png"),
        match=("step time",),
        threads="1",
    ),
    Bench(
        "logprobs_memory",
        "bench/bench_logprobs_memory.py",
        "Log-prob step memory: chunked over loss positions vs whole-row logits",
        "whole-row fp32 logits (`model.logprob_chunk_size=0`), same inputs, in the same run",
        (),
        ("--tokens", "4096", "--vocab", "8192", "--seq", "1024", "--prompt", "128"),
        match=("log-prob step memory",),
    ),
    Bench(
        "stream_scoring",
        "bench/bench_stream_scoring.py",
        "Streaming teacher scoring vs scoring after generation",
        "`train.stream_scoring=false` (teacher after generation), alternating in the same run",
        ("--prompts", "32", "--repeats", "3"),
        ("--prompts", "16", "--repeats", "1"),
        match=("streaming teacher",),
        threads="1",
    ),
    Bench(
        "async_overlap",
        "bench/bench_async_overlap.py",
        "Off-policy overlap: max_staleness=1 vs the synchronous loop",
        "`train.max_staleness=0` (generate, then train), same samples per step, alternating in the same run",
        ("--steps", "8", "--repeats", "3"),
        ("--steps", "4", "--repeats", "1"),
        match=("off-policy overlap",),
        threads="1",
    ),
    Bench(
        "teacher_columns",
        "bench/bench_teacher_columns.py",
        "GKD per-token columns to the trainer ranks: lists vs flat tensors",
        "every per-token column (ids, log-probs, top-k) as Python lists in every Sample, pickled to every rank "
        "(`broadcast_object_list`), same samples",
        match=("columns to the trainer", "top-k to the trainer"),
        threads="1",
    ),
)
RATIO_LINE = re.compile(r"(speed-?up|ratio|/ *GRPO|vs\.? |x \(|target)", re.IGNORECASE)


def machine() -> dict[str, str]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def accepts_json(script: Path) -> bool:
    return "--json" in script.read_text()


def run_bench(bench: Bench, quick: bool, timeout: float) -> dict:
    """Run one script; returns its command, status, output, wall time and (if any) its own doc section."""
    script = REPO / bench.script
    if not script.exists():
        return {"missing": True}
    args = list(bench.quick_args if quick and bench.quick_args else bench.args)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "out.json"
        if accepts_json(script):
            args += ["--json", str(json_path)]
        cmd = [sys.executable, "-m", bench.module] + args
        before = DOC.read_text() if DOC.exists() else ""
        env = dict(os.environ, OMP_NUM_THREADS=bench.threads)
        started = time.time()
        try:
            proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as err:
            status, stdout, stderr = "timeout", err.stdout or "", f"killed after {timeout:.0f} s"
        after = DOC.read_text() if DOC.exists() else ""
        own = after[len(before) :].strip() if after.startswith(before) and len(after) > len(before) else ""
        DOC.write_text(before) if own else None  # run_all reassembles the file itself
        data = None
        if json_path.exists():
            import json

            data = json.loads(json_path.read_text())
    shown = " ".join(
        [f"OMP_NUM_THREADS={bench.threads}", ".venv/bin/python", "-m", bench.module]
        + [a for a in args if a != "--json" and not a.endswith("out.json")]
    )
    return {
        "command": shown,
        "status": status,
        "stdout": stdout if isinstance(stdout, str) else stdout.decode(),
        "stderr": stderr if isinstance(stderr, str) else stderr.decode(),
        "wall_s": time.time() - started,
        "json": data,
        "own_section": own,
    }


def section(bench: Bench, result: dict, info: dict[str, str]) -> list[str]:
    """The generated part of a bench's section (a `### ` block; hand-written text above it is kept)."""
    lines = [f"### Latest `run_all` measurement: {bench.title}", ""]
    if result.get("missing"):
        return lines + [f"`{bench.script}` is not in this checkout; nothing measured.", ""]
    lines += [
        f"Command: `{result['command']}`  ",
        (f"Machine: {info['cores']} cores, {info['cpu']}, torch {info['torch']}, Python {info['python']}  "),
        f"Baseline (same run): {bench.baseline}  ",
        (
            f"Wall time: {result['wall_s']:.0f} s, exit status {result['status']}, "
            f"measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        ),
        "",
    ]
    if result["status"] != 0:
        tail = "\n".join(result["stderr"].strip().splitlines()[-15:])
        return lines + ["The script failed; last lines of its error output:", "", "```", tail, "```", ""]
    if result["own_section"]:
        return lines + [result["own_section"], ""]
    data = result.get("json") or {}
    if data.get("table"):
        lines += list(data["table"]) + [""]
    for image in data.get("images", []):
        lines += [f"![{bench.name}]({Path(image).relative_to('docs') if image.startswith('docs/') else image})", ""]
    ratios = [ln.strip() for ln in result["stdout"].splitlines() if RATIO_LINE.search(ln)]
    if ratios:
        lines += ["Ratios against the baseline:", ""] + [f"- {r}" for r in ratios] + [""]
    lines += [
        "<details><summary>full output</summary>",
        "",
        "```",
        result["stdout"].rstrip(),
        "```",
        "",
        "</details>",
        "",
    ]
    return lines


def comparison_section(run: bool) -> list[str]:
    lines = ["## Method comparison (accuracy, not speed)", ""]
    if run:
        cmd = [sys.executable, "-m", "bench.compare_methods", "--workers", "2"]
        subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    lines += [
        (
            "RLAD against GRPO, KDRL, on-policy and offline distillation and two RLAD controls, from the same "
            "teacher, student initialisations and budget, with paired statistics: see "
            "[method_comparison.md](method_comparison.md) "
            "(`OMP_NUM_THREADS=1 .venv/bin/python -m bench.compare_methods --workers 2`)."
        ),
        "",
    ]
    return lines


def split_sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    """(text before the first `## ` heading, [(heading, body)]) of a markdown file."""
    parts = re.split(r"^## (.*)$", text, flags=re.MULTILINE)
    return parts[0], [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- run_all:{name} -->", f"<!-- /run_all:{name} -->"


def strip_generated(body: str, name: str) -> str:
    """A section body without run_all's previously generated block (the hand-written text stays)."""
    begin, end = _markers(name)
    return re.sub(re.escape(begin) + r".*?" + re.escape(end), "", body, flags=re.DOTALL).strip()


def _find(sections: list[tuple[str, str]], bench: Bench) -> int | None:
    for i, (heading, _) in enumerate(sections):
        if heading == bench.title or any(word in heading.lower() for word in bench.match):
            return i
    return None


def assemble(
    results: Sequence[tuple[Bench, dict]],
    info: dict[str, str],
    argv: Sequence[str],
    with_comparison: bool,
    previous: str = "",
    benches: Sequence[Bench] | None = None,
) -> str:
    """The whole benchmarks.md: header, status table, one section per bench (hand-written text of an
    existing section kept, run_all's block replaced), other existing sections unchanged."""
    ran_benches = {bench.name: bench for bench, _ in results}
    if benches is None:  # BENCHES order, then any other bench that ran
        benches = [ran_benches.get(b.name, b) for b in BENCHES] + [
            b for b, _ in results if b.name not in {x.name for x in BENCHES}
        ]
    lines = [
        "# Benchmarks",
        "",
        (
            "Each section is owned by the package it measures (its hand-written text is kept); "
            "`bench/run_all.py` (`make bench`) appends to each the output of its latest run. Every figure is "
            "a ratio against a baseline measured in the same run on the same machine; the machine is shared "
            "and small (CPU only), so absolute numbers are indicative and the ratios are what to compare."
        ),
        "",
        f"Command: `.venv/bin/python -m bench.run_all {' '.join(argv)}`".rstrip() + "  ",
        f"Machine: {info['cores']} cores, {info['cpu']}, torch {info['torch']}, Python {info['python']}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
    ]
    ran = {bench.name: result for bench, result in results}
    _, sections = split_sections(previous)
    lines += ["| benchmark | script | status | wall s |", "|---|---|---|---|"]
    body: list[str] = []
    used = set()
    for bench in benches:
        index = _find(sections, bench)
        result = ran.get(bench.name)
        if result is None:  # not rerun this time (--only): its section stays as it was
            if index is not None:
                used.add(index)
                body += [f"## {sections[index][0]}", "", sections[index][1].strip(), ""]
                lines.append(f"| {bench.title} | `{bench.script}` | kept from an earlier run | - |")
            continue
        status = (
            "missing" if result.get("missing") else ("ok" if result["status"] == 0 else f"failed ({result['status']})")
        )
        wall = "-" if result.get("missing") else f"{result['wall_s']:.0f}"
        lines.append(f"| {bench.title} | `{bench.script}` | {status} | {wall} |")
        heading, hand = (
            (sections[index][0], strip_generated(sections[index][1], bench.name))
            if index is not None
            else (bench.title, "")
        )
        used.add(index)
        begin, end = _markers(bench.name)
        body += [f"## {heading}", ""] + ([hand, ""] if hand else []) + [begin, *section(bench, result, info), end, ""]
    lines += [""] + body
    for i, (heading, text) in enumerate(sections):
        if i not in used and not heading.startswith("Method comparison"):
            lines += [f"## {heading}", "", text.strip(), ""]
    lines += comparison_section(with_comparison)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these benchmarks")
    ap.add_argument("--quick", action="store_true", help="smaller settings where a script has them")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per benchmark")
    ap.add_argument("--with-comparison", action="store_true", help="also run the (long) method comparison")
    args = ap.parse_args(argv)
    raw = list(argv if argv is not None else sys.argv[1:])
    info = machine()
    results = []
    for bench in BENCHES:
        if args.only and bench.name not in args.only:
            continue
        print(f"[run_all] {bench.name} ...", flush=True)
        result = run_bench(bench, args.quick, args.timeout)
        print(
            f"[run_all] {bench.name}: "
            + ("missing" if result.get("missing") else f"status {result['status']}, {result['wall_s']:.0f} s"),
            flush=True,
        )
        results.append((bench, result))
    previous = DOC.read_text() if DOC.exists() else ""  # after the runs: a script may edit its own section
    DOC.write_text(assemble(results, info, raw, args.with_comparison, previous))
    print(f"[run_all] wrote {DOC.relative_to(REPO)}")
    return 0 if all(r.get("missing") or r["status"] == 0 for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
