"""Pure statistics of the method comparison: per-run primary metric, paired tests across (student init,
seed) pairs, Holm's correction, confidence intervals and effect sizes. Input: the per-run results dicts
compare_methods writes (`{"spec": {...}, "eval": [rows], "train": [rows]}`); no I/O, so the unit tests
drive every function with hand-computed values.

Exact where it matters: the Student-t CDF comes from the regularised incomplete beta function (a
continued fraction), the sign test from the binomial distribution; no approximations by the normal.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Result = dict


# ----------------------------------------------------------------------------- descriptive
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value). NaN for no values."""
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


def mean_of_last(result: Result, key: str, last: int) -> float:
    """The primary per-run metric: the mean of the last `last` evals of `key` (less noisy than the final one)."""
    _, values = curve(result, key)
    if not values:
        raise ValueError(f"run {result.get('spec')} has no eval rows with {key!r}")
    tail = values[-last:]
    return sum(tail) / len(tail)


def train_mean(result: Result, key: str, skip_first: int = 0) -> float:
    """Mean of a per-step train metric over the run (NaN when the run never logged it)."""
    vals = [float(r[key]) for r in result.get("train", [])[skip_first:] if key in r]
    return sum(vals) / len(vals) if vals else math.nan


def mean_curve(results: Sequence[Result], key: str) -> tuple[list[int], list[float], list[float]]:
    """Mean and std over runs at the eval steps every run has."""
    curves = [dict(zip(*curve(r, key))) for r in results]
    if not curves:
        return [], [], []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_std([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def pair_key(result: Result) -> tuple[int, int]:
    """Runs are paired by (student init, seed): same initial weights, same data order and sampling seed."""
    return int(result["spec"]["init"]), int(result["spec"]["seed"])


def paired_values(a: Iterable[Result], b: Iterable[Result], key: str, last: int) -> list[tuple[float, float]]:
    """(metric of a, metric of b) for every (init, seed) both methods finished, in pair order."""
    by_a = {pair_key(r): mean_of_last(r, key, last) for r in a}
    by_b = {pair_key(r): mean_of_last(r, key, last) for r in b}
    return [(by_a[p], by_b[p]) for p in sorted(set(by_a) & set(by_b))]


# ----------------------------------------------------------------------------- distributions
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} must be in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df={df} must be > 0")
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p (bisection; |error| < 1e-7, limited by the CDF near t = 0)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p} must be in (0, 1)")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return (lo + hi) / 2.0


# ----------------------------------------------------------------------------- tests and effect sizes
def paired_t_test(diffs: Sequence[float]) -> tuple[float, float]:
    """(t, two-sided p) of H0: mean difference = 0. Needs >= 2 differences; all-equal differences give
    t = +-inf and p = 0 when their mean is non-zero, t = 0 and p = 1 when it is zero."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean, sd = mean_std(diffs)
    if sd == 0.0:
        return (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(n))
    return t, 2.0 * (1.0 - t_cdf(abs(t), n - 1))


def mean_ci(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-based confidence interval of the mean difference."""
    n = len(diffs)
    if n < 2:
        raise ValueError(f"a confidence interval needs at least 2 values, got {n}")
    mean, sd = mean_std(diffs)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def cohens_dz(diffs: Sequence[float]) -> float:
    """Standardised paired effect size: mean difference / sd of the differences (NaN if sd = 0)."""
    mean, sd = mean_std(diffs)
    return mean / sd if sd > 0 else math.nan


def sign_test(diffs: Sequence[float]) -> tuple[int, int, float]:
    """(wins, non-tied pairs, exact two-sided binomial p under P(win) = 1/2); ties are dropped."""
    wins = sum(d > 0 for d in diffs)
    n = sum(d != 0 for d in diffs)
    if n == 0:
        return 0, 0, 1.0
    k = min(wins, n - wins)
    p = 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return wins, n, min(1.0, p)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, made monotone, capped at 1), in the input order.
    A comparison is significant at family-wise level a when its adjusted p <= a."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def compare(pairs: Sequence[tuple[float, float]], level: float = 0.95) -> dict:
    """Everything the report says about one paired comparison (a - b per pair); p_holm is filled by the caller."""
    diffs = [a - b for a, b in pairs]
    out = {"n": len(diffs), "mean_a": mean_std([a for a, _ in pairs])[0], "mean_b": mean_std([b for _, b in pairs])[0]}
    if len(diffs) < 2:
        return dict(out, diff=math.nan, ci=(math.nan, math.nan), dz=math.nan, t=math.nan, p=math.nan, sign=(0, 0, 1.0))
    diff, low, high = mean_ci(diffs, level)
    t, p = paired_t_test(diffs)
    return dict(out, diff=diff, ci=(low, high), dz=cohens_dz(diffs), t=t, p=p, sign=sign_test(diffs))


# ----------------------------------------------------------------------------- the learning-rate pilot
def choose_lr(pilots: Sequence[dict], clip_range: tuple[float, float] = (0.01, 0.05)) -> dict:
    """The largest pilot lr whose training reward rose (mean of the last third of steps above the first
    third) and whose mean clip fraction (high + low) stayed <= clip_range[1]; if none rose, the smallest lr.
    Returns {"lr", "reason", "clip_frac", "clip_binds"} (clip_binds: the chosen lr's clip fraction >= 1%)."""
    rows = sorted(({"lr": p["lr"], **pilot_summary(p)} for p in pilots), key=lambda r: r["lr"])
    good = [r for r in rows if r["reward_rise"] > 0 and r["clip_frac"] <= clip_range[1]]
    chosen = good[-1] if good else rows[0]
    reason = "largest lr with rising reward and clip fraction <= 5%" if good else "no lr raised reward: smallest"
    return {
        "lr": chosen["lr"],
        "reason": reason,
        "clip_frac": chosen["clip_frac"],
        "clip_binds": chosen["clip_frac"] >= clip_range[0],
        "pilots": rows,
    }


def pilot_summary(pilot: dict) -> dict:
    rewards = [float(r["reward/mean"]) for r in pilot["train"] if "reward/mean" in r]
    third = max(1, len(rewards) // 3)
    rise = (sum(rewards[-third:]) / third - sum(rewards[:third]) / third) if rewards else math.nan
    clips = [float(r.get("clip_frac_high", 0.0)) + float(r.get("clip_frac_low", 0.0)) for r in pilot["train"]]
    return {"reward_rise": rise, "clip_frac": sum(clips) / len(clips) if clips else math.nan}


def fmt(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
