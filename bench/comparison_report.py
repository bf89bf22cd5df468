"""Tables and plots of the method comparison, rebuilt from the per-job JSON files alone (the committed
`bench/comparison_results/<size>/`), written between the generated-results markers of
docs/method_comparison.md (the hand-written text around them is left alone). Plots (matplotlib, when
installed) go to docs/img/method_comparison/.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import comparison_stats as st

BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"
CLIP_BINDS = 0.01
"""Below this mean clip fraction (high + low) the trust region hardly ever binds: TRRD's mechanism is not tested."""

LABELS = {
    "grpo": "GRPO",
    "kdrl": "KDRL (k2, beta 0.05)",
    "opd": "On-policy distillation",
    "sft_offline": "Offline distillation (SFT)",
    "rlad": "RLAD (alpha 0.5)",
    "rlad_self_teacher": "RLAD, teacher = initial student",
    "rlad_one_update": "RLAD, one update per batch",
}
RLAD_COMPARISONS = ("grpo", "kdrl", "opd", "rlad_self_teacher", "rlad_one_update", "sft_offline")


def load(results: Path) -> dict:
    """{"teacher": dict | None, "students": [dict], "pilots": [dict], "runs": {method: [result]}}."""

    def read(path: Path):
        return json.loads(path.read_text()) if path.exists() else None

    runs: dict[str, list[dict]] = {}
    for path in sorted(results.glob("runs/*/*.json")):
        result = json.loads(path.read_text())
        runs.setdefault(result["spec"]["method"], []).append(result)
    return {
        "teacher": read(results / "setup" / "teacher.json"),
        "students": [json.loads(p.read_text()) for p in sorted(results.glob("setup/student_init*.json"))],
        "pilots": [json.loads(p.read_text()) for p in sorted(results.glob("pilot/*.json"))],
        "runs": runs,
    }


def keys(size) -> dict[str, str]:
    """Eval keys: primary at the rollout temperature, the same at the extra eval temperature, hardest difficulty."""
    k, (t_roll, t_other) = size.setup.eval_k, size.eval_temperatures
    hardest = max(size.setup.difficulties)
    return {
        f"T={t_roll:g}": f"eval/avg@{k}",
        f"T={t_other:g}": f"eval/avg@{k}@T{t_other:g}",
        f"T={t_roll:g}, difficulty {hardest}": f"eval/difficulty={hardest}/avg@{k}",
    }


def _setup_lines(data: dict, size) -> list[str]:
    if not (data["teacher"] or data["students"] or data["pilots"]):
        return []
    lines = ["### Set-up: teacher, students (ceiling check) and the learning-rate pilot", ""]
    k = size.setup.eval_k
    t = data["teacher"]
    if t:
        verdict = "meets" if t["meets_bar"] else "**misses**"
        lines.append(f"Teacher: held-out avg@{k} at T=1 = {t['avg_at_k_T1']:.3f} ({verdict} the bar {t['bar']}).")
        lines.append("")
    if data["students"]:
        lines += [
            f"| student init | RL start: SFT steps | start avg@{k} (T=1) | in band | ceiling avg@{k} (T=1) | ceiling ok |",
            "|---|---|---|---|---|---|",
        ]
        for s in data["students"]:
            band = "{:g}-{:g}".format(*s["start_band"])
            lines.append(
                f"| {s['init']} | {s['start_steps']} | {s['start_avg_at_k_T1']:.3f} | "
                f"{'yes' if s['start_in_band'] else 'no'} ({band}) | {s['ceiling_avg_at_k_T1']:.3f} | "
                f"{'yes' if s['ceiling_ok'] else 'no'} (>= {s['min_ceiling']}) |"
            )
        lines.append("")
    if data["pilots"]:
        choice = st.choose_lr(data["pilots"])
        lines += ["| pilot lr (GRPO) | reward rise (last third - first third) | clip fraction |", "|---|---|---|"]
        lines += [f"| {p['lr']:g} | {p['reward_rise']:+.3f} | {p['clip_frac']:.2%} |" for p in choice["pilots"]]
        lines += [
            "",
            f"Chosen lr **{choice['lr']:g}** ({choice['reason']}), frozen for every method. Its pilot clip fraction "
            f"is {choice['clip_frac']:.2%}"
            + ("." if choice["clip_binds"] else ": under 1%, so the pilot did not exercise the trust region."),
            "",
        ]
    return lines


def method_rows(data: dict, size) -> list[dict]:
    rows = []
    for method in [m for m in LABELS if m in data["runs"]]:
        runs = data["runs"][method]
        row = {"method": method, "n": len(runs)}
        for label, key in keys(size).items():
            found = [st.mean_of_last(r, key, size.last_evals) for r in runs if st.curve(r, key)[0]]
            row[label] = st.mean_std(found)
        row["start"] = st.mean_std([st.curve(r, keys(size)[f"T={size.eval_temperatures[0]:g}"])[1][0] for r in runs])
        for name in ("clip_frac_high", "clip_frac_low", "clip_differs_from_grpo_frac", "bound_moved_frac"):
            row[name] = st.mean_std([st.train_mean(r, name) for r in runs])[0]
        row["clip"] = (
            row["clip_frac_high"] + row["clip_frac_low"] if not math.isnan(row["clip_frac_high"]) else math.nan
        )
        row["informative"] = 1.0 - st.mean_std([st.train_mean(r, "zero_adv_group_frac") for r in runs])[0]
        extra = st.mean_std([st.train_mean(r, "dynamic_sampling/extra_prompts") for r in runs])[0]
        row["generations"] = (size.prompts_per_step + (0.0 if math.isnan(extra) else extra)) * size.group_size
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2%}"


def _method_lines(rows: list[dict], size) -> list[str]:
    labels = list(keys(size))
    head = f"| method | runs | start (T={size.eval_temperatures[0]:g}) | " + " | ".join(labels)
    lines = [
        f"Primary metric: held-out avg@{size.setup.eval_k}, mean of the last {size.last_evals} evals of each run; "
        "mean ± sd over runs (student inits x seeds).",
        "",
        head + " | clipped (high + low) | clip state differs from GRPO | bound moved > 0.05 | informative groups "
        "| generations / step |",
        "|---|" + "---|" * (len(labels) + 7),
    ]
    for r in rows:
        lines.append(
            f"| {LABELS[r['method']]} | {r['n']} | {st.fmt(*r['start'])} | "
            + " | ".join(st.fmt(*r[label]) for label in labels)
            + f" | {_pct(r['clip'])} | {_pct(r['clip_differs_from_grpo_frac'])} | {_pct(r['bound_moved_frac'])} "
            f"| {_pct(r['informative'])} | {r['generations']:.0f} |"
        )
    return lines + [""]


def comparisons(data: dict, size, key: str) -> list[dict]:
    """RLAD against each other method on `key`, paired by (init, seed); Holm-adjusted over this family."""
    rlad = data["runs"].get("rlad", [])
    out = []
    for other in RLAD_COMPARISONS:
        if other in data["runs"] and rlad:
            pairs = st.paired_values(rlad, data["runs"][other], key, size.last_evals)
            out.append({"other": other, **st.compare(pairs)})
    tested = [c for c in out if not math.isnan(c["p"])]
    for c, p in zip(tested, st.holm([c["p"] for c in tested])):
        c["p_holm"] = p
    return out


def _comparison_lines(found: list[dict], label: str) -> list[str]:
    lines = [
        f"RLAD minus each method at {label} (paired by student init and seed; 95% t interval; Cohen's d_z; "
        "two-sided paired t-test, Holm-adjusted over the rows of this table; exact sign test):",
        "",
        "| RLAD vs | pairs | RLAD | other | difference [95% CI] | d_z | p (t-test) | p (Holm) | RLAD wins (sign test p) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in found:
        if math.isnan(c["diff"]):
            lines.append(f"| {LABELS[c['other']]} | {c['n']} | - | - | too few pairs | - | - | - | - |")
            continue
        wins, n, p_sign = c["sign"]
        dz = "-" if math.isnan(c["dz"]) else f"{c['dz']:+.2f}"
        lines.append(
            f"| {LABELS[c['other']]} | {c['n']} | {c['mean_a']:.3f} | {c['mean_b']:.3f} | {c['diff']:+.3f} "
            f"[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {dz} "
            f"| {c['p']:.3g} | {c['p_holm']:.3g} "
            f"| {wins}/{n} ({p_sign:.3g}) |"
        )
    return lines + [""]


def _clip_lines(rows: list[dict]) -> list[str]:
    lines = []
    for r in rows:
        if r["method"].startswith("rlad") and not math.isnan(r["clip"]):
            tested = r["clip"] >= CLIP_BINDS
            lines.append(
                f"- {LABELS[r['method']]}: clip fraction {r['clip']:.2%}, clip state differs from GRPO's on "
                f"{_pct(r['clip_differs_from_grpo_frac'])} of tokens: "
                + ("the trust region binds." if tested else "under 1%, **the trust-region mechanism is not tested**.")
            )
    return ["Where the clip binds:", "", *lines, ""] if lines else []


def _sanity_lines(data: dict) -> list[str]:
    """With teacher = the initial student, the teacher's log-probs at step 1 equal the trainer's old log-probs
    (same weights, same tokens): a k1 gap far from 0 would mean teacher scoring and training disagree."""
    gaps = [
        float(r["train"][0]["kl/old_vs_teacher_k1"])
        for r in data["runs"].get("rlad_self_teacher", [])
        if r["train"] and "kl/old_vs_teacher_k1" in r["train"][0]
    ]
    if not gaps:
        return []
    worst = max(abs(g) for g in gaps)
    return [
        f"Sanity check: with teacher = initial student, step-1 mean lp_old - lp_T is at most {worst:.1e} in "
        f"absolute value over {len(gaps)} runs (0 up to rounding when teacher scoring matches the trainer).",
        "",
    ]


def _plot(data: dict, size, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(keys(size).items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (label, key) in zip(axes[0], panels):
        for method in [m for m in LABELS if m in data["runs"]]:
            runs = data["runs"][method]
            steps, mean, sd = st.mean_curve(runs, key)
            ax.plot(steps, mean, marker="o", ms=3, label=f"{LABELS[method]} (n={len(runs)})")
            ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.1)
        ax.set_xlabel("RL step")
        ax.set_ylabel(f"held-out avg@{size.setup.eval_k}")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(results: Path, size, size_name: str, doc: Path, img: Path, command: str = "") -> str:
    """Rebuild the generated block of `doc` from the JSON files under `results`; returns the block."""
    data = load(results)
    command = command or f"python -m bench.compare_methods --size {size_name} --report"
    lines = [BEGIN, f"<!-- rebuilt by `{command}` from the per-run results; do not edit by hand -->", ""]
    lines += _setup_lines(data, size)
    rows = method_rows(data, size)
    if not rows:
        lines += ["No finished runs in the results folder yet: run the command above.", ""]
    else:
        lines += ["### Methods", "", *_method_lines(rows, size)]
        for label, key in list(keys(size).items())[:2]:
            lines += _comparison_lines(comparisons(data, size, key), label)
        lines += _clip_lines(rows)
        lines += _sanity_lines(data)
        plot = img / f"{size_name}_curves.png"
        if _plot(data, size, plot):
            rel = plot.relative_to(doc.parent) if plot.is_relative_to(doc.parent) else plot
            lines += [f"![learning curves]({rel.as_posix()})", ""]
        else:
            lines += ["(matplotlib is not installed: learning-curve plots skipped.)", ""]
    lines.append(END)
    block = "\n".join(lines)
    _splice(doc, block)
    return block


def _splice(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Method comparison\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(head + block + tail)
