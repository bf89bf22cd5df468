"""Pure statistics of the method comparison: final metrics over seeds, mean curves, steps to reach a
target, paired differences, per-phase step times. Input: the results dicts compare_methods writes
(`{"spec": {...}, "eval": [rows], "train": [rows]}`); no I/O here, so the unit tests drive it directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Result = dict


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value). NaN mean for no values."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def curve(result: Result, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of an eval metric, one point per eval (the last one wins on a repeated step)."""
    points: dict[int, float] = {}
    for row in result.get("eval", []):
        if key in row:
            points[int(row["step"])] = float(row[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def final(result: Result, key: str) -> float:
    _, values = curve(result, key)
    if not values:
        raise ValueError(f"run {result.get('spec')} has no eval rows with {key!r}")
    return values[-1]


def mean_curve(results: Sequence[Result], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over runs at the eval steps every run has."""
    curves = [dict(zip(*curve(r, key))) for r in results]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_std([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def steps_to_reach(steps: Sequence[int], values: Sequence[float], target: float) -> int | None:
    """First step whose value is >= target (1e-9 tolerance for float round-off); None if never."""
    for step, value in zip(steps, values):
        if value >= target - 1e-9:
            return int(step)
    return None


def by_seed(results: Iterable[Result]) -> dict[int, Result]:
    return {int(r["spec"]["seed"]): r for r in results}


def paired_diff(a: dict[int, Result], b: dict[int, Result], key: str) -> tuple[float, float, int, int]:
    """Mean and std over common seeds of final(a) - final(b), the number of seeds where a > b, and n."""
    seeds = sorted(set(a) & set(b))
    diffs = [final(a[s], key) - final(b[s], key) for s in seeds]
    mean, sd = mean_std(diffs)
    return mean, sd, sum(d > 0 for d in diffs), len(seeds)


def phase_times(results: Sequence[Result], skip_first: int = 1) -> dict[str, float]:
    """Mean seconds per step of each `time/<phase>` over all runs' train rows (first steps skipped:
    they include one-off warm-up)."""
    sums: dict[str, float] = {}
    count = 0
    for result in results:
        for row in result.get("train", [])[skip_first:]:
            count += 1
            for key, value in row.items():
                if key.startswith("time/"):
                    sums[key[5:]] = sums.get(key[5:], 0.0) + float(value)
    return {phase: total / count for phase, total in sums.items()} if count else {}


def group_results(results: Iterable[Result]) -> dict[tuple[str, str], list[Result]]:
    """{(task, method): [results sorted by seed]}."""
    out: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        out.setdefault((r["spec"]["task"], r["spec"]["method"]), []).append(r)
    for runs in out.values():
        runs.sort(key=lambda r: int(r["spec"]["seed"]))
    return out


def fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
