"""`rlad report RUN_DIR... --out DIR`: compare runs with PNG plots and a markdown table.

Reads only what every run writes: `<run_dir>/metrics.jsonl` (rows with `step`, `kind` = train or
eval, and flat metric names, see observe.py) and `<run_dir>/config.yaml` (for the algorithm
name). Writes `reward.png` (train reward mean vs step), `eval.png` (each eval metric vs step)
and `report.md` (one row per run: algorithm, steps, first / last / best values).
Left out: smoothing controls, confidence bands across seeds.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlad_megatron.observe import read_metrics

REWARD_KEY = "reward/mean"


def _series(rows: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = {int(r["step"]): float(r[key]) for r in rows if r.get("kind", "train") == kind and key in r}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _algorithm(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.exists():
        return "?"
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return str((data.get("algorithm") or {}).get("name", "?"))


def _eval_keys(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The accuracy columns: avg@k and the largest pass@j (what the paper tables report)."""
    keys = {k for rows in runs.values() for r in rows if r.get("kind") == "eval" for k in r if k.startswith("eval/")}
    avg = sorted(k for k in keys if k.startswith("eval/avg@"))
    passes = sorted((k for k in keys if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1]))
    return avg + passes[-1:]


def load_runs(run_dirs: Sequence[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """{label: metric rows}; the label is the folder name (made unique with its parent when needed)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for run_dir in map(Path, run_dirs):
        if not (run_dir / "metrics.jsonl").exists():
            raise FileNotFoundError(
                f"{run_dir}/metrics.jsonl not found: is {run_dir} a run folder written by `rlad train`?"
            )
        label = run_dir.name if run_dir.name not in runs else f"{run_dir.parent.name}/{run_dir.name}"
        runs[label] = read_metrics(run_dir)
    return runs


def plot(runs: dict[str, list[dict[str, Any]]], kind: str, keys: Sequence[str], out: Path, title: str) -> Path | None:
    """One panel per key, one line per run; None when no run has any of the keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(_series(rows, kind, k)[0] for rows in runs.values())]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, rows in runs.items():
            steps, values = _series(rows, kind, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(runs: dict[str, list[dict[str, Any]]], run_dirs: Sequence[Path]) -> str:
    """Markdown: per run, reward first/last and each eval metric first/last/best."""
    eval_keys = _eval_keys(runs)
    header = ["run", "algorithm", "steps", "reward first", "reward last"]
    for key in eval_keys:
        header += [f"{key[5:]} first", f"{key[5:]} last", f"{key[5:]} best"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (label, rows), run_dir in zip(runs.items(), run_dirs):
        steps, rewards = _series(rows, "train", REWARD_KEY)
        cells = [
            label,
            _algorithm(Path(run_dir)),
            str(steps[-1] if steps else 0),
            _fmt(rewards[0] if rewards else None),
            _fmt(rewards[-1] if rewards else None),
        ]
        for key in eval_keys:
            _, values = _series(rows, "eval", key)
            cells += [
                _fmt(values[0] if values else None),
                _fmt(values[-1] if values else None),
                _fmt(max(values) if values else None),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write reward.png, eval.png (when any run evaluated) and report.md into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(run_dirs)
    written: dict[str, Path] = {}
    reward_png = plot(runs, "train", [REWARD_KEY, "accuracy"], out / "reward.png", "training reward")
    eval_png = plot(runs, "eval", _eval_keys(runs), out / "eval.png", "evaluation")
    body = ["# Run comparison", "", table(runs, [Path(p) for p in run_dirs])]
    for name, path in (("reward", reward_png), ("eval", eval_png)):
        if path is not None:
            written[name] = path
            body.append(f"![{name}]({path.name})\n")
    written["table"] = out / "report.md"
    written["table"].write_text("\n".join(body))
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="run folders written by `rlad train` (each holds metrics.jsonl)")
    parser.add_argument("--out", default="report", help="output folder for the PNG plots and report.md")


def run(args: argparse.Namespace) -> int:
    try:
        written = write_report(args.run_dirs, args.out)
    except FileNotFoundError as err:
        print(f"rlad report: {err}")
        return 2
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
