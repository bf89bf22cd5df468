"""avg@k, the unbiased pass@k estimator, and per-metadata breakdowns.

pass@k for a prompt with n samples of which c are correct is 1 - C(n-c, k) / C(n, k) (Chen et
al., 2021), computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms huge binomials.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def ks_to_report(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def flatten(metadata: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"difficulty": {"n_people": 3}} -> {"difficulty.n_people": 3}; lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in metadata.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        elif isinstance(value, (str, int, float, bool)) or value is None:
            flat[path] = value
    return flat


def breakdown_values(metadata: dict[str, Any], keys: Sequence[str]) -> list[tuple[str, Any]]:
    """(path, value) pairs of the record's metadata selected by `keys` (a key selects itself and its sub-keys)."""
    return [(p, v) for p, v in flatten(metadata).items() if any(p == k or p.startswith(k + ".") for k in keys)]


def summarize(per_prompt: Iterable[dict[str, Any]], k: int) -> dict[str, float]:
    """Mean over prompts of avg@k, pass@j, reward and response length. Each item: num_correct, rewards, lengths."""
    items = list(per_prompt)
    out: dict[str, float] = {"num_prompts": len(items)}
    if not items:
        return out
    out[f"avg@{k}"] = sum(p["num_correct"] for p in items) / (k * len(items))
    for j in ks_to_report(k):
        out[f"pass@{j}"] = sum(pass_at_k(k, p["num_correct"], j) for p in items) / len(items)
    out["mean_reward"] = sum(sum(p["rewards"]) for p in items) / (k * len(items))
    out["mean_response_length"] = sum(sum(p["lengths"]) for p in items) / (k * len(items))
    return out


def by_metadata(per_prompt: Sequence[dict[str, Any]], keys: Sequence[str], k: int) -> dict[str, dict[str, dict]]:
    """{path: {value: summarize(prompts with that value)}} for every selected metadata path."""
    groups: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for p in per_prompt:
        for path, value in breakdown_values(p["metadata"], keys):
            groups[path][str(value)].append(p)

    def order(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return {
        path: {v: summarize(groups[path][v], k) for v in sorted(groups[path], key=order)} for path in sorted(groups)
    }
