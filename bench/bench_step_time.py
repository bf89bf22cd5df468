"""RLAD's time per step vs GRPO's, split by phase, from the phase timings the training loop records.

Both algorithms run the same config (same student, teacher, prompts, group size, lengths) on the
method comparison's prepared `addition` teacher / student; runs alternate GRPO, RLAD, GRPO, RLAD...
so a burst of load on a shared machine hits both. Per phase (`time/generate`, `time/score` =
teacher scoring, `time/logprobs` = old log-probs, `time/train`, `time/sync`) the best (least
disturbed) and the median step are reported (the first step of each run, with its warm-up, is
dropped), with three RLAD / GRPO ratios: best step, median step, and 1 + RLAD's scoring time over
GRPO's step (RLAD's only added phase; the rest is the same work). The paper reports about +15%.

  OMP_NUM_THREADS=1 .venv/bin/python -m bench.bench_step_time [--steps 6] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

PHASES = ("generate", "score", "logprobs", "train", "sync", "step")
TARGET = 1.15


def _steps(algorithm: str, paths, size, steps: int, seed: int, run_dir: Path) -> list[dict[str, float]]:
    from bench.compare_methods import RunSpec, run_overrides
    from rlad_megatron.config import load_config
    from rlad_megatron.train import train

    spec = RunSpec("bench", "addition", algorithm, seed)
    overrides = run_overrides(spec, replace(size, num_steps=steps, eval_interval=0), paths, run_dir)
    overrides += ["data.eval=''", "checkpoint.save_hf=false"]  # no eval: time the steps only
    return train(load_config(None, overrides), resume=False)


def measure(steps: int, repeats: int, setup_root: Path) -> dict[str, list[dict[str, float]]]:
    """{algorithm: per-step metric rows} over repeats x (steps - 1) steps each (warm-up steps dropped)."""
    from bench.compare_methods import SIZES
    from bench.comparison_setup import prepare

    size = SIZES["small"]
    paths = prepare(replace(size.setup, task="addition"), setup_root)
    rows: dict[str, list[dict[str, float]]] = {"grpo": [], "rlad": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for algorithm in rows:
                run_dir = Path(tmp) / f"{algorithm}_{rep}"
                rows[algorithm] += _steps(algorithm, paths, size, steps, 100 + rep, run_dir)[1:]
                shutil.rmtree(run_dir, ignore_errors=True)
    return rows


def summarize(rows: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{"best" | "median": {algorithm: {phase: seconds}}}. Best = least-disturbed step on a shared machine."""
    out: dict[str, dict[str, dict[str, float]]] = {"best": {}, "median": {}}
    for alg, history in rows.items():
        values = {p: [r.get(f"time/{p}", 0.0) for r in history] for p in PHASES}
        out["best"][alg] = {p: min(v) for p, v in values.items()}
        out["median"][alg] = {p: statistics.median(v) for p, v in values.items()}
    return out


def ratios(stats: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    best, med = stats["best"], stats["median"]
    return {
        "best_step": best["rlad"]["step"] / best["grpo"]["step"],
        "median_step": med["rlad"]["step"] / med["grpo"]["step"],
        # RLAD adds one phase (teacher scoring); the others do the same work as GRPO's.
        "added_scoring": 1.0 + med["rlad"]["score"] / med["grpo"]["step"],
    }


def table(stats: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    b, m = stats["best"], stats["median"]
    lines = ["| phase | GRPO best s | RLAD best s | GRPO median s | RLAD median s |", "|---|---|---|---|---|"]
    for phase in PHASES:
        lines.append(
            f"| {phase} | {b['grpo'][phase]:.3f} | {b['rlad'][phase]:.3f} | {m['grpo'][phase]:.3f} | "
            f"{m['rlad'][phase]:.3f} |"
        )
    return lines


def plot(medians: dict[str, dict[str, float]], path: Path) -> None:
    """Stacked bar per algorithm: seconds per step by phase (best step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2))
    names = list(medians)
    bottoms = [0.0] * len(names)
    for phase in PHASES[:-1]:
        heights = [medians[n][phase] for n in names]
        ax.bar([n.upper() for n in names], heights, bottom=bottoms, label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("seconds per step (best step)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    ap.add_argument("--repeats", type=int, default=2, help="GRPO/RLAD run pairs")
    ap.add_argument(
        "--setup-root",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "compare" / "small" / "setup" / "addition",
    )
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    ap.add_argument("--plot", type=Path, help="write a per-phase bar chart (PNG) here")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step of each run is dropped)")
    warnings.filterwarnings("ignore")
    started = time.time()
    stats = summarize(measure(args.steps, args.repeats, args.setup_root))
    r = ratios(stats)
    print("\n".join(table(stats)))
    verdict = "within" if r["best_step"] <= TARGET else "over"
    print(
        f"RLAD / GRPO time per step: {r['best_step']:.2f}x best step, {r['median_step']:.2f}x median step, "
        f"{r['added_scoring']:.2f}x from the added teacher-scoring phase alone (paper: about {TARGET:.2f}x; "
        f"best step {verdict} the +15% target) [{time.time() - started:.0f} s]"
    )
    images = []
    if args.plot:
        plot(stats["best"], args.plot)
        images.append(str(args.plot))
    if args.json:
        args.json.write_text(
            json.dumps({"stats": stats, "ratios": r, "target": TARGET, "table": table(stats), "images": images})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
