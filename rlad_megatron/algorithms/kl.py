"""Sampled-token KL estimators and the KDRL distillation term (docs/algorithms.md sections 2 and 4).

On a token y_t sampled from the student, with R = lp_target - lp (target: teacher or reference):
    k1 = -R                 unbiased value; as a loss its gradient is grad lp (no KL signal)
    k2 = 0.5 * R^2          gradient -R * grad lp = (lp - lp_T) * grad lp: the on-policy
                            score-function gradient of KL(pi_S || pi_T)   (KDRL's choice)
    k3 = exp(R) - R - 1     unbiased value, biased gradient as a loss (reported worse)

KDRL: J = J_GRPO - beta * D(pi_S || pi_T). k2 / k3 enter as a loss `beta * k(lp_T - lp)`;
k1 enters the token advantage instead: A_t = A + beta * (lp_T - lp_old), detached, which is
gradient-equivalent to k2 at the first update of a batch. beta is constant or annealed:
    beta_t = max(kd_coef_start - kd_coef_decay * step, kd_coef_min)
Reward-guided masking removes the KD term on responses whose reward marks them correct.

Shape legend: per-token tensors share one shape [*] (padded [B, S] or packed [1, T]).
Left out: full-vocabulary or top-k KL for KDRL (the paper reports top-k as unstable).
"""

from __future__ import annotations

from typing import Any

import torch

from .aggregation import Count, aggregate, token_share

ESTIMATORS = ("k1", "k2", "k3")


def kl_estimator(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate [*] of KL(pi || pi_ref) on sampled tokens; `ref_logprobs` is the target (no grad)."""
    log_ratio = ref_logprobs - logprobs  # R
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kind={kind!r} is not allowed; choose one of {list(ESTIMATORS)}")


def kd_coef_at(step: int, cfg: Any) -> float:
    """KDRL beta at optimizer step `step` from an AlgorithmConfig-like object (kd_schedule, kd_coef*)."""
    if cfg.kd_schedule == "constant":
        return float(cfg.kd_coef)
    if cfg.kd_schedule == "annealed":
        return max(float(cfg.kd_coef_start) - float(cfg.kd_coef_decay) * step, float(cfg.kd_coef_min))
    raise ValueError(
        f"algorithm.kd_schedule={cfg.kd_schedule!r} is not allowed; choose one of ['constant', 'annealed']"
    )


def incorrect_mask(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """Reward-guided masking: True where the KD term applies (reward < threshold, i.e. not correct)."""
    return rewards < threshold


def kd_advantage_term(old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, coef: float) -> torch.Tensor:
    """KDRL-k1 token advantage term beta * (lp_T - lp_old) [*], detached."""
    return (coef * (teacher_logprobs - old_logprobs)).detach()


def kd_loss(
    logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kind: str,
    coef: float,
    aggregation: str,
    num_tokens: Count,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
    correct: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KDRL loss term beta * k(lp_T - lp) aggregated over `mask` minus `correct` tokens.

    `num_tokens` (global masked-token count) is always needed: the metrics are token means.
    `correct` [*] bool (optional): tokens of responses judged correct; they get no KD term
    but still count in the denominators, so masking never rescales the other tokens.
    Metrics: `kd_kl` (the estimator's token mean over every masked token, unmasked by reward),
    `kd_masked_frac` (share of tokens removed by reward-guided masking).
    """
    if kind not in ("k2", "k3"):
        raise ValueError(f"kd loss estimator {kind!r} must be k2 or k3 (k1 is an advantage term: kd_advantage_term)")
    per_token = kl_estimator(logprobs, teacher_logprobs, kind)
    kd_mask = mask.bool() if correct is None else mask.bool() & ~correct.bool()
    loss = coef * aggregate(
        per_token, kd_mask, aggregation=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, seq_weights=seq_weights
    )
    metrics = {
        "kd_kl": token_share(per_token, mask, num_tokens),
        "kd_masked_frac": token_share(mask.bool() & ~kd_mask, mask, num_tokens),
    }
    return loss, metrics
