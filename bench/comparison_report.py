"""Tables and plots of the method comparison, written between the generated-results markers of
docs/method_comparison.md (the hand-written analysis around them is left alone) and to
`<out>/summary.json`. Plots go to docs/img/method_comparison/.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from pathlib import Path

import comparison_stats as st

BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"


def markers(tag: str = "") -> tuple[str, str]:
    """Begin / end markers of one generated block (several blocks, e.g. sizes, can share a doc)."""
    return (BEGIN, END) if not tag else (f"<!-- generated:begin {tag} -->", f"<!-- generated:end {tag} -->")


LABELS = {
    "grpo": "GRPO",
    "kdrl_const": "KDRL (constant beta)",
    "kdrl_anneal": "KDRL (annealed beta)",
    "opd": "On-policy distillation",
    "sft_offline": "Offline distillation (SFT)",
    "rlad": "RLAD (alpha 0.5)",
    "rlad_live": "RLAD, clamp_mode=live",
    "grpo_dyn": "GRPO + dynamic sampling",
    "rlad_dyn": "RLAD + dynamic sampling",
    "rlad_weak_teacher": "RLAD, teacher = student init",
    "rlad_clamp0.2": "RLAD, teacher log-ratio clamp 0.2",
}


def load_results(out: Path) -> list[dict]:
    results = []
    for path in sorted(out.glob("*/*/seed*.json")):
        results.append(json.loads(path.read_text()))
    return results


def _keys(size) -> tuple[str, str]:
    return f"eval/avg@{size.eval_k}", f"eval/pass@{size.eval_k}"


def method_rows(groups: dict, task: str, methods: Sequence[str], size) -> list[dict]:
    avg_key, pass_key = _keys(size)
    grpo = groups.get((task, "grpo"), [])
    target = st.mean_std([st.final(r, avg_key) for r in grpo])[0] if grpo else math.nan
    grpo_start = st.mean_std([st.curve(r, avg_key)[1][0] for r in grpo])[0] if grpo else math.nan
    # "Steps to GRPO's final accuracy" only means something when GRPO ended above where it started.
    grpo_improved = not math.isnan(target) and target > grpo_start
    rows = []
    for method in methods:
        runs = groups.get((task, method), [])
        if not runs:
            continue
        steps, mean, _ = st.mean_curve(runs, avg_key)
        reach = st.steps_to_reach(steps[1:], mean[1:], target) if grpo_improved else "n/a"
        times = st.phase_times(runs)
        rows.append(
            {
                "task": task,
                "method": method,
                "seeds": [int(r["spec"]["seed"]) for r in runs],
                "avg": st.mean_std([st.final(r, avg_key) for r in runs]),
                "pass": st.mean_std([st.final(r, pass_key) for r in runs]),
                "initial": st.mean_std([st.curve(r, avg_key)[1][0] for r in runs]),
                "last3": st.mean_std(
                    [sum(st.curve(r, avg_key)[1][-3:]) / len(st.curve(r, avg_key)[1][-3:]) for r in runs]
                ),
                "change": st.mean_std([st.final(r, avg_key) - st.curve(r, avg_key)[1][0] for r in runs]),
                "steps_to_grpo_final": reach,
                "grpo_final": target,
                "grpo_steps": size.num_steps,
                "time_per_step": times.get("step", math.nan),
            }
        )
    return rows


def _table(rows: list[dict], k: int) -> list[str]:
    lines = [
        (
            f"| method | seeds | final avg@{k} | final pass@{k} | avg@{k}, mean of last 3 evals | avg@{k} change "
            f"from step 0 | steps to GRPO's final avg@{k} | s/step |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        reach = "not reached" if r["steps_to_grpo_final"] is None else str(r["steps_to_grpo_final"])
        change = "-" if math.isnan(r["change"][0]) else f"{r['change'][0]:+.3f} ± {r['change'][1]:.3f}"
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {len(r['seeds'])} | {st.fmt(*r['avg'])} | "
            f"{st.fmt(*r['pass'])} | {st.fmt(*r['last3'])} | {change} | {reach} | {r['time_per_step']:.2f} |"
        )
    return lines


def _paired(groups: dict, task: str, methods: Sequence[str], key: str) -> list[str]:
    rlad = st.by_seed(groups.get((task, "rlad"), []))
    lines = [f"| RLAD minus ... (final {key[5:]}, paired by seed) | mean ± std | seeds RLAD higher |", "|---|---|---|"]
    for method in methods:
        other = st.by_seed(groups.get((task, method), []))
        if method == "rlad" or not other or not rlad:
            continue
        mean, sd, wins, n = st.paired_diff(rlad, other, key)
        lines.append(f"| {LABELS.get(method, method)} | {mean:+.3f} ± {sd:.3f} | {wins}/{n} |")
    return lines


def _ablation(groups: dict, task: str, size) -> tuple[list[str], list[tuple[float, float, float]]]:
    avg_key, pass_key = _keys(size)
    names = [
        (0.1, "rlad_a0.1"),
        (0.3, "rlad_a0.3"),
        (0.5, "rlad"),
        (0.7, "rlad_a0.7"),
        (0.9, "rlad_a0.9"),
        (1.0, "grpo"),
    ]
    lines = [f"| alpha | seeds | avg@{size.eval_k} | pass@{size.eval_k} |", "|---|---|---|---|"]
    points = []
    for alpha, method in names:
        runs = groups.get((task, method), [])
        if not runs:
            continue
        avg = st.mean_std([st.final(r, avg_key) for r in runs])
        lines.append(
            f"| {alpha}{' (GRPO)' if method == 'grpo' else ''} | {len(runs)} | {st.fmt(*avg)} | "
            f"{st.fmt(*st.mean_std([st.final(r, pass_key) for r in runs]))} |"
        )
        points.append((alpha, avg[0], avg[1]))
    return lines, points


DIAGNOSTICS = (
    ("zero_adv_group_frac", "zero-adv groups"),
    ("clip_frac_high", "clipped high"),
    ("clip_frac_low", "clipped low"),
    ("teacher_widened_frac", "teacher widened"),
    ("teacher_narrowed_frac", "teacher narrowed"),
    ("clamp_active_frac", "clamp active"),
    ("teacher_log_ratio_mean", "mean lp - lp_T"),
    ("accuracy", "train accuracy"),
)


def _diagnostics(groups: dict, task: str, methods: Sequence[str]) -> list[str]:
    """Per-step training metrics averaged over steps and seeds (what the loss saw, not what eval saw)."""
    lines = [
        "| method | " + " | ".join(label for _, label in DIAGNOSTICS) + " |",
        "|---" * (len(DIAGNOSTICS) + 1) + "|",
    ]
    for method in methods:
        rows = [row for r in groups.get((task, method), []) for row in r.get("train", [])]
        if not rows:
            continue
        cells = []
        for key, _ in DIAGNOSTICS:
            values = [float(row[key]) for row in rows if key in row]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return lines


def _plot_curves(groups: dict, task: str, methods: Sequence[str], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method in methods:
        runs = groups.get((task, method), [])
        if not runs:
            continue
        steps, mean, sd = st.mean_curve(runs, key)
        ax.plot(steps, mean, marker="o", ms=3, label=f"{LABELS.get(method, method)} (n={len(runs)})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.12)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"held-out {key[5:]}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_alpha(points: list[tuple[float, float, float]], path: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3)
    ax.set_xlabel("alpha (weight of the old student in the anchor; 1.0 = GRPO)")
    ax.set_ylabel(f"final held-out {key[5:]}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _setup_table(out: Path, size) -> list[str]:
    """Teacher and student quality after their SFT set-up runs (eval at T=1.0, k=4)."""
    from comparison_setup import sft_eval

    lines = ["| task | teacher avg@4 / pass@4 (T=1.0) | student init avg@4 / pass@4 (T=1.0) |", "|---|---|---|"]
    for task in size.tasks:
        t, s = (sft_eval(out / "setup" / task / f"{role}_sft") for role in ("teacher", "student"))
        if t and s:
            lines.append(
                f"| {task} | {t.get('eval/avg@4', math.nan):.3f} / {t.get('eval/pass@4', math.nan):.3f} | "
                f"{s.get('eval/avg@4', math.nan):.3f} / {s.get('eval/pass@4', math.nan):.3f} |"
            )
    return lines + [""] if len(lines) > 2 else []


def write_report(out: Path, size, size_name: str, doc: Path, tag: str = "", command: str = "") -> str:
    """Aggregate every finished run under `out` into the doc's block `tag`; returns the block."""
    import torch
    from compare_methods import EXPLAIN_METHODS, MAIN_METHODS

    groups = st.group_results(load_results(out))
    img = doc.parent / "img" / "method_comparison"
    avg_key, _ = _keys(size)
    rel = img.relative_to(doc.parent)
    begin, end = markers(tag)
    prefix = f"{tag}_" if tag else ""
    command = command or f"OMP_NUM_THREADS=1 .venv/bin/python bench/compare_methods.py --size {size_name} --workers 2"
    lines = [
        begin,
        (
            f"Size `{size_name}`: {size.num_steps} steps x {size.prompts_per_step} prompts x "
            f"{size.group_size} samples, lr {size.lr}, held-out {size.setup.num_test} prompts x k={size.eval_k} "
            f"(T=0.6), eval every {size.eval_interval} steps. Machine: {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}. Command: `{command}`."
        ),
        "",
    ]
    lines += [
        (
            "Steps to GRPO's final avg@k: first eval step (after step 0) where the seed-mean curve reaches "
            "GRPO's seed-mean final value; n/a when GRPO ended below where it started."
        ),
        "",
    ]
    lines += _setup_table(out, size)
    summary = {"size": size_name, "tasks": {}}
    for task in size.tasks:
        rows = method_rows(groups, task, MAIN_METHODS, size)
        if not rows:
            continue
        summary["tasks"][task] = rows
        _plot_curves(
            groups,
            task,
            MAIN_METHODS,
            avg_key,
            img / f"{prefix}{task}_curves.png",
            f"{task}: held-out accuracy vs step (mean ± std over seeds)",
        )
        lines += [
            f"### Task `{task}`",
            "",
            *_table(rows, size.eval_k),
            "",
            *_paired(groups, task, MAIN_METHODS, avg_key),
            "",
            f"![{task} curves]({rel}/{prefix}{task}_curves.png)",
            "",
            "Training diagnostics (means over steps and seeds):",
            "",
            *_diagnostics(groups, task, MAIN_METHODS),
            "",
        ]
    first = size.tasks[0]
    ablation, points = _ablation(groups, first, size)
    if len(points) > 2:
        _plot_alpha(points, img / f"{prefix}alpha_ablation.png", avg_key)
        lines += [
            f"### Alpha ablation (`{first}`)",
            "",
            *ablation,
            "",
            f"![alpha ablation]({rel}/{prefix}alpha_ablation.png)",
            "",
        ]
    explain = method_rows(groups, first, ("grpo", "rlad") + EXPLAIN_METHODS, size)
    if any(r["method"] in EXPLAIN_METHODS for r in explain):
        _plot_curves(
            groups,
            first,
            ("grpo", "rlad") + EXPLAIN_METHODS,
            avg_key,
            img / f"{prefix}explain_curves.png",
            f"{first}: explanatory runs",
        )
        lines += [
            f"### Explanatory runs (`{first}`)",
            "",
            *_table(explain, size.eval_k),
            "",
            *_diagnostics(groups, first, ("grpo", "rlad") + EXPLAIN_METHODS),
            "",
            f"![explanatory runs]({rel}/{prefix}explain_curves.png)",
            "",
        ]
        summary["explain"] = explain
    lines.append(end)
    block = "\n".join(lines)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    _splice(doc, block, begin, end)
    return block


def _splice(doc: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    text = doc.read_text() if doc.exists() else f"# Method comparison\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(head + block + tail)
