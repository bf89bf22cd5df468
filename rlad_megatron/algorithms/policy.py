"""PPO / GRPO clipped surrogate with asymmetric clip (docs/algorithms.md section 2).

    ratio_t = exp(log_ratio_t)                  GRPO: log_ratio_t = lp - lp_old
    loss_t  = -w_t * min(ratio_t * A_t, clip(ratio_t, 1 - clip_low, 1 + clip_high) * A_t)
              + ref_kl_coef * k(lp_ref - lp)    (optional, default off)
w_t is an optional per-token importance weight (no gradient), 1 when absent: the truncated
importance-sampling correction for off-policy samples (off_policy.py); the ratio stays anchored on
lp_old (decoupled PPO).

`clipped_policy_loss` takes the log-ratio, so TRRD (trrd.py) reuses it with its own anchor.
Aggregation (token_mean or seq_mean_token_mean) is aggregation.py's; the returned loss is this
micro-batch's share of the step loss, and every metric is a detached token-mean share (sum the
shares over micro-batches and data-parallel ranks to get the step value).

Clip fractions count tokens where the clip is ACTIVE, i.e. where it zeroes the gradient:
    clip_frac_high: A_t > 0 and ratio_t > 1 + clip_high
    clip_frac_low:  A_t < 0 and ratio_t < 1 - clip_low
A ratio outside the range on the side the advantage does not push still has gradient, so it
does not count. Left out: dual-clip PPO.

Shape legend: every per-token tensor has one shape [*] (padded [B, S] or packed [1, T]);
advantages are per token (the group advantage broadcast over each response).
"""

from __future__ import annotations

from typing import TypedDict

import torch

from .aggregation import AggregationArgs, Count, aggregate, token_share
from .kl import kl_estimator

Metrics = dict[str, torch.Tensor]


class ClipArgs(TypedDict):
    """The clip and reference-KL keyword arguments that `policy_loss`, `clipped_policy_loss` and
    `trrd_loss` share (passed on as `**clip`): declared once, built from the config by the objective."""

    clip_low: float
    clip_high: float
    ref_logprobs: torch.Tensor | None
    ref_kl_coef: float
    ref_kl_estimator: str
    is_weights: torch.Tensor | None
    """Per-token importance weights [*] on the policy-gradient term (off_policy.py), or None."""


def _check_same_shape(**tensors: torch.Tensor | None) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"per-token tensors must share one shape, got {shapes}")


def clipped_policy_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    num_tokens: Count,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
    logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_kl_coef: float = 0.0,
    ref_kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Clipped surrogate of a given per-token `log_ratio` [*] (with grad); see module docstring.

    `logprobs` is needed only for the reference-KL term (its gradient path); `is_weights` [*] multiplies
    each token's policy-gradient term (detached).
    """
    _check_same_shape(
        log_ratio=log_ratio, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs, is_weights=is_weights
    )
    advantages = advantages.detach().to(log_ratio.dtype)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg_per_token = torch.maximum(-ratio * advantages, -clipped_ratio * advantages)
    if is_weights is not None:
        pg_per_token = pg_per_token * is_weights.detach().to(pg_per_token.dtype)
    agg = AggregationArgs(aggregation=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, seq_weights=seq_weights)
    pg_loss = aggregate(pg_per_token, mask, **agg)
    metrics: Metrics = {
        "pg_loss": pg_loss.detach(),
        "clip_frac_high": token_share((advantages > 0) & (ratio > 1.0 + clip_high), mask, num_tokens),
        "clip_frac_low": token_share((advantages < 0) & (ratio < 1.0 - clip_low), mask, num_tokens),
        "ratio_mean": token_share(ratio, mask, num_tokens),
    }
    if ref_kl_coef == 0.0:
        return pg_loss, metrics
    if ref_logprobs is None or logprobs is None:
        raise ValueError("ref_kl_coef > 0 needs ref_logprobs (and logprobs): score the batch with the reference model")
    ref_kl = kl_estimator(logprobs, ref_logprobs.detach(), ref_kl_estimator)
    metrics["ref_kl"] = token_share(ref_kl, mask, num_tokens)
    return pg_loss + ref_kl_coef * aggregate(ref_kl, mask, **agg), metrics


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    aggregation: str,
    num_tokens: Count,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_kl_coef: float = 0.0,
    ref_kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO / PPO loss share and metrics; all per-token inputs [*], `logprobs` carries the gradient.

    num_tokens: masked tokens in the whole optimizer step (all micro-batches, all DP ranks).
    num_seqs:   responses in the whole step (needed for seq_mean_token_mean).
    seq_weights: per-token 1/len(response) [*]; required for packed rows (see aggregation.py).
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    return clipped_policy_loss(
        logprobs - old_logprobs.detach(),
        advantages,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        aggregation=aggregation,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
        seq_weights=seq_weights,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        ref_kl_coef=ref_kl_coef,
        ref_kl_estimator=ref_kl_estimator,
        is_weights=is_weights,
    )
