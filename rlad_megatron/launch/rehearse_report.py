"""The rehearsal's report and checks: DIR/rehearsal.md, DIR/rehearsal.json and the screen.

Everything is read from what the job itself left behind: `<run_dir>/metrics.jsonl` (the trainer's
per-phase `time/*`, the `kl/rollout_vs_old_*` log-prob agreement, the teacher's `kl/old_vs_teacher_*`),
`<run_dir>/config.yaml` (the URLs the node agent gave the trainer), plus what the rehearsal saw from outside
(`rehearse_watch`: server start-up, weight versions, faults). A check that fails makes `rlad rehearse` exit 1.

Left out: throughput comparisons against a cluster (a CPU rehearsal says nothing about GPU speed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlad_megatron.observe import read_metrics

LOGPROB_TOL = 1e-3
"""Max |rollout log-prob - trainer log-prob| on a sampled token: both sides run float32 (a stale weight sync or
a temperature / truncation mismatch shows as 1e-2 and more)."""
PHASES = ("generate", "score", "logprobs", "train", "sync", "step")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Attempt:
    """One run of the job script (restart = SLURM_RESTART_COUNT)."""

    restart: int
    exit_code: int
    wall_s: float
    resumed_from: str
    servers: list[dict[str, Any]]
    faults: list[dict[str, Any]] = field(default_factory=list)
    log: str = ""


def train_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if r.get("kind") == "train"]


def phase_table(rows: Sequence[dict[str, Any]]) -> str:
    """Seconds per phase per step (time/*), and the rollout-vs-trainer log-prob agreement."""
    phases = [p for p in PHASES if any(f"time/{p}" in r for r in rows)]
    head = ["step", *phases, "max abs lp diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["step"])] + [f"{r.get(f'time/{p}', 0.0):.2f}" for p in phases]
        lp = logprob_gap(r)
        lines.append("| " + " | ".join(cells + ["n/a" if lp is None else f"{lp:.2e}"]) + " |")
    return "\n".join(lines)


PLAN_PHASES = {
    "generate": ("generate",),
    "teacher_score": ("score",),
    "train": ("logprobs", "train"),
    "weight_sync": ("sync",),
}
"""`rlad plan`'s phase estimate -> the trainer's `time/*` phases that measure it."""


def measured_seconds(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per step of each plan phase, from `time/*`; the first step (start-up) is left out when there
    are later ones."""
    steady = list(rows[1:] or rows)
    return {
        key: sum(r.get(f"time/{p}", 0.0) for r in steady for p in phases) / max(len(steady), 1)
        for key, phases in PLAN_PHASES.items()
    }


def plan_table(plan_seconds: dict[str, float] | None, rows: Sequence[dict[str, Any]], why_no_plan: str = "") -> str:
    """The recipe's `rlad plan` estimate (cluster seconds, phases one after another) beside the rehearsal's
    measured seconds per step (CPU, shrunk job), each as seconds and as a share of their sum. Only the shares
    compare: they show whether the shrunk job keeps the recipe's balance between phases."""
    if plan_seconds is None:
        return f"No plan estimate: {why_no_plan}"
    measured = measured_seconds(rows)
    keys = [k for k in PLAN_PHASES if k in plan_seconds or measured.get(k)]
    plan_total = sum(plan_seconds.get(k, 0.0) for k in keys) or 1.0
    measured_total = sum(measured[k] for k in keys) or 1.0
    lines = [
        "| phase | plan s (cluster) | plan share | rehearsal s/step (CPU) | rehearsal share |",
        "|---|---|---|---|---|",
    ]
    for k in keys:
        planned = plan_seconds.get(k)
        plan_cells = ["n/a", "n/a"] if planned is None else [f"{planned:.1f}", f"{planned / plan_total:.0%}"]
        lines.append(
            f"| {k} | " + " | ".join([*plan_cells, f"{measured[k]:.2f}", f"{measured[k] / measured_total:.0%}"]) + " |"
        )
    return "\n".join(lines)


def logprob_gap(row: dict[str, Any]) -> float | None:
    """max |rollout - trainer log-prob| of one step (`kl/rollout_vs_old_max_abs`); None when not logged."""
    value = row.get("kl/rollout_vs_old_max_abs")
    return None if value is None else float(value)


def check_steps(rows: Sequence[dict[str, Any]], steps: int) -> Check:
    got = [int(r["step"]) for r in rows]
    return Check("steps", got == list(range(1, steps + 1)), f"train steps logged {got}, expected 1..{steps} once each")


def check_logprobs(rows: Sequence[dict[str, Any]], tol: float = LOGPROB_TOL) -> Check:
    """Servers and trainer agree on the log-probs of the same weights. Steps trained on samples from the previous
    weights (train.max_staleness=1: `staleness/max` > 0) are left out: their rollout log-probs are the previous
    policy's by design (the truncated importance weights account for them)."""
    off_policy = [int(r["step"]) for r in rows if r.get("staleness/max")]
    gaps = {int(r["step"]): logprob_gap(r) for r in rows if int(r["step"]) not in off_policy}
    missing = [s for s, g in gaps.items() if g is None]
    if missing or not gaps:
        return Check(
            "rollout log-probs",
            False,
            f"kl/rollout_vs_old_max_abs not logged at steps {missing}: the "
            "trainer did not compare the servers' log-probs with its own",
        )
    measured = [g for g in gaps.values() if g is not None]
    worst = max(measured)
    return Check(
        "rollout log-probs",
        worst <= tol,
        f"max |rollout - trainer log-prob| {worst:.2e} (tolerance {tol:.0e}), per step "
        + ", ".join(f"{s}: {g:.1e}" for s, g in gaps.items())
        + (f"; steps {off_policy} trained on the previous weights' samples, left out" if off_policy else ""),
    )


def check_staleness(rows: Sequence[dict[str, Any]], max_staleness: int) -> Check:
    """train.max_staleness: every step trained on samples at most that many weight versions old, and some step
    on samples generated while the previous step trained (the overlap happened)."""
    lags = {int(r["step"]): r.get("staleness/max") for r in rows}
    ok = all(v is not None and v <= max_staleness for v in lags.values()) and max_staleness in lags.values()
    return Check(
        "off-policy overlap",
        ok,
        f"staleness/max per step {lags}: each at most train.max_staleness={max_staleness}, and at least one "
        "step trained on samples generated during the previous step",
    )


def check_versions(attempt: Attempt, expected: int) -> Check:
    """Every rollout server of the attempt served weights version `expected` when the job stopped."""
    rollout = [s for s in attempt.servers if s["fleet"] == "rollout"]
    wrong = {s["url"]: s["version"] for s in rollout if s["version"] != str(expected)}
    return Check(
        f"weight versions (attempt {attempt.restart})",
        bool(rollout) and not wrong,
        f"{len(rollout)} rollout server(s); expected version {expected}"
        + (f"; last seen {wrong}" if wrong else ", all served it at the end"),
    )


def check_teacher_router(run_dir: Path, rows: Sequence[dict[str, Any]], router_url: str) -> Check:
    """The trainer was given only the teacher router, and teacher log-probs reached every step."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else {}
    urls = (config.get("teacher") or {}).get("urls")
    scored = [int(r["step"]) for r in rows if "kl/old_vs_teacher_k1" in r]
    ok = urls == [router_url] and len(scored) == len(rows) > 0
    return Check(
        "teacher via router",
        ok,
        f"trainer's teacher.urls={urls} (router {router_url}); teacher log-probs at steps {scored}",
    )


def check_exit(attempt: Attempt, expect_failure: bool) -> Check:
    ok = attempt.exit_code != 0 if expect_failure else attempt.exit_code == 0
    want = "non-zero (trainer killed)" if expect_failure else "0"
    return Check(
        f"job exit (attempt {attempt.restart})",
        ok,
        f"exit code {attempt.exit_code}, expected {want}; log {attempt.log}",
    )


def check_samples(rows: Sequence[dict[str, Any]], per_step: int) -> Check:
    """Every step trained on exactly prompts x group samples (the client's accounting: none lost, none twice)."""
    counts = {int(r["step"]): r.get("num_samples") for r in rows}
    ok = bool(counts) and all(c == per_step for c in counts.values())
    return Check("samples once", ok, f"samples per step {counts}, expected {per_step}")


def check_server_restarted(attempt: Attempt, port: int) -> Check:
    """The node agent's log says it restarted the killed server."""
    text = Path(attempt.log).read_text(errors="replace") if Path(attempt.log).exists() else ""
    line = next((ln for ln in text.splitlines() if "[restart]" in ln and f"port {port} " in ln), "")
    return Check(
        "killed server restarted",
        bool(line),
        line.strip()
        or f"no '[restart] ... port {port}' line in "
        f"{attempt.log}: the node agent did not restart it (launch.restart_servers)",
    )


def check_server_rejoined(attempt: Attempt, url: str, expected: int) -> Check:
    """The restarted server answered again and took part in a later weight sync (it serves the final version)."""
    seen = next((s for s in attempt.servers if s["url"] == url), None) or {"rejoined": 0, "version": None}
    kill = next((f["at_s"] for f in attempt.faults if f["kind"] == "server"), None)
    ok = seen["rejoined"] >= 1 and seen["version"] == str(expected)
    hint = (
        ""
        if ok
        else (
            f"; the job ended {attempt.wall_s - (kill or 0):.0f} s after the kill (a restart takes the "
            "agent's back-off plus a server start-up): rehearse more --steps after the kill"
        )
    )
    return Check(
        "killed server rejoined",
        ok,
        f"{url}: back up {seen['rejoined']} time(s) after the kill, last "
        f"weight version {seen['version']} (expected {expected}){hint}",
    )


def summary(rows: Sequence[dict[str, Any]], attempts: Sequence[Attempt]) -> dict[str, Any]:
    totals = {p: round(sum(r.get(f"time/{p}", 0.0) for r in rows), 2) for p in PHASES}
    startup = {s["url"]: s["first_up_s"] for a in attempts[:1] for s in a.servers}
    return {
        "phase_seconds_total": totals,
        "server_startup_s": startup,
        "job_seconds": [round(a.wall_s, 1) for a in attempts],
    }


def render_markdown(
    title: str,
    changes_table: str,
    rows: Sequence[dict[str, Any]],
    attempts: Sequence[Attempt],
    checks: Sequence[Check],
    plan_phases: str = "",
) -> str:
    parts = [
        f"# Rehearsal: {title}",
        "",
        "## What changed from the recipe",
        "",
        changes_table,
        "",
        "## Phases per step (seconds, from metrics.jsonl)",
        "",
        phase_table(rows),
        "",
    ]
    if plan_phases:
        parts += ["## Phases: the recipe's `rlad plan` estimate beside this rehearsal", "", plan_phases, ""]
    parts += ["## Job attempts", ""]
    for a in attempts:
        parts.append(
            f"* attempt {a.restart} (SLURM_RESTART_COUNT={a.restart}): exit {a.exit_code}, {a.wall_s:.0f} s"
            + (f", resumed from {a.resumed_from}" if a.resumed_from else "")
            + f"; log {a.log}"
        )
        for s in a.servers:
            up = "never answered" if s["first_up_s"] is None else f"up after {s['first_up_s']:.0f} s"
            parts.append(
                f"  * {s['fleet']} {s['url']}: {up}, last weight version {s['version']}"
                + (f", rejoined {s['rejoined']}x" if s["rejoined"] else "")
            )
        parts += [f"  * fault at {f['at_s']} s: {f['what']}" for f in a.faults]
    parts += ["", "## Checks", ""] + [f"* {'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks]
    return "\n".join(parts) + "\n"


def write_report(
    out: Path,
    title: str,
    changes_table: str,
    changes: list[dict],
    rows: Sequence[dict[str, Any]],
    attempts: Sequence[Attempt],
    checks: Sequence[Check],
    plan_seconds: dict[str, float] | None = None,
    why_no_plan: str = "",
) -> str:
    text = render_markdown(title, changes_table, rows, attempts, checks, plan_table(plan_seconds, rows, why_no_plan))
    (out / "rehearsal.md").write_text(text)
    data = {
        "recipe": title,
        "ok": all(c.ok for c in checks),
        "changes": changes,
        "attempts": [asdict(a) for a in attempts],
        "checks": [asdict(c) for c in checks],
        "steps": [
            {k: v for k, v in r.items() if k.startswith(("time/", "kl/rollout_vs_old")) or k == "step"} for r in rows
        ],
        **summary(rows, attempts),
        "plan_seconds": plan_seconds,
        "measured_seconds_per_step": measured_seconds(rows),
    }
    (out / "rehearsal.json").write_text(json.dumps(data, indent=2))
    return text
