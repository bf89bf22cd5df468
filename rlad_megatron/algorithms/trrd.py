"""RLAD's Trust Region Ratio Distillation (TRRD), docs/algorithms.md section 3.

The teacher enters only through the PPO ratio; there is no separate distillation loss:
    log r_t = alpha * (lp - lp_old) + (1 - alpha) * (lp - lp_T)
            = lp - anchor_t,    anchor_t = alpha * lp_old + (1 - alpha) * lp_T
    loss_t  = -min(r_t * A_t, clip(r_t, 1 - clip_low, 1 + clip_high) * A_t)   (+ optional ref KL)
alpha weights the OLD STUDENT: alpha = 1 is exactly GRPO, alpha = 0 anchors on the teacher.

Stabiliser: the teacher log-ratio d_t = lp - lp_T is clamped to [-c, c] (c =
`teacher_log_ratio_clamp`, 0 = off). Whether gradient passes the clamp is open in the paper:
  clamp_mode="detached" (default): anchor_t = alpha*lp_old + (1-alpha)*(sg(lp) - clamp(sg(lp) - lp_T)),
      so the value is the clamped formula and d(log r_t)/d(lp) = 1 everywhere: the gradient is
      always r_t * A_t * grad lp where the PPO clip is inactive.
  clamp_mode="live": log r_t = alpha*(lp - lp_old) + (1-alpha)*clamp(lp - lp_T, -c, c); where the
      clamp is active the (1 - alpha) part of the gradient is cut.

Trust-region metrics, relative to plain GRPO on the same batch (same advantages, anchor = lp_old).
Define the anchor shift
    s_t = anchor_t - lp_old = (1 - alpha) * (teacher anchor - lp_old)   (= log r_GRPO - log r_TRRD)
The PPO clip boundary of a token moves by s_t in lp-space. Two metrics carry that information:
  clip_differs_from_grpo_frac: tokens whose clip state (clipped high / clipped low / not clipped)
      differs from GRPO's clip state at the same lp; where it is 0 the update is GRPO with a
      per-token weight r_TRRD / r_GRPO, and the trust region itself plays no part.
  bound_moved_frac: tokens with A_t != 0 whose bound moved by more than BOUND_SHIFT_THRESHOLD
      nats (|s_t| > 0.05); tokens with A_t = 0 get no gradient, so their bound does not matter.

`teacher_mask` (optional, [*] bool) marks tokens that get the teacher term; elsewhere the anchor is
lp_old (plain GRPO). Used to drop the final EOS when teacher and student end turns differently.

Shape legend: every per-token tensor has one shape [*] (padded [B, S] or packed [1, T]).
Left out: a renormalised (log-sum-exp) mixture anchor; the paper's anchor is not renormalised.
"""

from __future__ import annotations

import torch

from .aggregation import Count, token_share
from .policy import Metrics, _check_same_shape, clipped_policy_loss

CLAMP_MODES = ("detached", "live")
BOUND_SHIFT_THRESHOLD = 0.05
"""|s_t| in nats above which `bound_moved_frac` counts a token's trust-region bound as moved."""


def trrd_log_ratio(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    alpha: float,
    teacher_log_ratio_clamp: float,
    clamp_mode: str = "detached",
    teacher_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log r_t with grad, anchor shift s_t, clamp_active bool), each [*]; see module docstring."""
    if clamp_mode not in CLAMP_MODES:
        raise ValueError(f"clamp_mode={clamp_mode!r} is not allowed; choose one of {list(CLAMP_MODES)}")
    old_logprobs, teacher_logprobs = old_logprobs.detach(), teacher_logprobs.detach()
    c = teacher_log_ratio_clamp
    lp_sg = logprobs.detach()
    d_sg = lp_sg - teacher_logprobs
    clamp_active = d_sg.abs() > c if c > 0 else torch.zeros_like(d_sg, dtype=torch.bool)
    # The teacher's part of the anchor from a detached lp, so no gradient crosses the clamp.
    teacher_anchor = lp_sg - (torch.clamp(d_sg, -c, c) if c > 0 else d_sg)
    if teacher_mask is not None:
        keep = teacher_mask.bool()
        teacher_anchor = torch.where(keep, teacher_anchor, old_logprobs)
        clamp_active = clamp_active & keep
    # Computed from the anchor, not as a difference of log-ratios, so it is exactly 0 when
    # teacher, old and current student agree.
    shift = (1.0 - alpha) * (teacher_anchor - old_logprobs)
    if clamp_mode == "detached":
        log_ratio = logprobs - (alpha * old_logprobs + (1.0 - alpha) * teacher_anchor)
    else:
        d = logprobs - teacher_logprobs
        teacher_term = torch.clamp(d, -c, c) if c > 0 else d
        if teacher_mask is not None:
            teacher_term = torch.where(keep, teacher_term, logprobs - old_logprobs)
        log_ratio = alpha * (logprobs - old_logprobs) + (1.0 - alpha) * teacher_term
    return log_ratio, shift, clamp_active


def trrd_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    clip_low: float,
    clip_high: float,
    teacher_log_ratio_clamp: float,
    clamp_mode: str = "detached",
    aggregation: str,
    num_tokens: Count,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
    teacher_mask: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    ref_kl_coef: float = 0.0,
    ref_kl_estimator: str = "k3",
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """TRRD loss share and metrics; per-token inputs [*], `logprobs` carries the gradient.

    Metrics (detached token-mean shares over `num_tokens`): clip_frac_high, clip_frac_low,
    ratio_mean, pg_loss, clip_differs_from_grpo_frac, bound_moved_frac, clamp_active_frac,
    teacher_log_ratio_mean (unclamped lp - lp_T), and ref_kl when the reference term is on.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, teacher_logprobs=teacher_logprobs, mask=mask)
    log_ratio, shift, clamp_active = trrd_log_ratio(
        logprobs,
        old_logprobs,
        teacher_logprobs,
        alpha=alpha,
        teacher_log_ratio_clamp=teacher_log_ratio_clamp,
        clamp_mode=clamp_mode,
        teacher_mask=teacher_mask,
    )
    loss, metrics = clipped_policy_loss(
        log_ratio,
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
    adv = advantages.detach().to(shift.dtype)
    grpo_log_ratio = logprobs.detach() - old_logprobs.detach()
    clip_differs = _clip_state(log_ratio.detach(), adv, clip_low, clip_high) != _clip_state(
        grpo_log_ratio, adv, clip_low, clip_high
    )
    teacher_tokens = mask.bool() if teacher_mask is None else mask.bool() & teacher_mask.bool()
    metrics.update(
        clip_differs_from_grpo_frac=token_share(clip_differs, mask, num_tokens),
        bound_moved_frac=token_share((adv != 0) & (shift.abs() > BOUND_SHIFT_THRESHOLD), mask, num_tokens),
        clamp_active_frac=token_share(clamp_active, mask, num_tokens),
        teacher_log_ratio_mean=token_share(logprobs - teacher_logprobs, teacher_tokens, num_tokens),
    )
    return loss, metrics


def _clip_state(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> torch.Tensor:
    """[*] int8: +1 clipped high (A > 0, r > 1 + clip_high), -1 clipped low (A < 0, r < 1 - clip_low), else 0."""
    ratio = torch.exp(log_ratio)
    high = (advantages > 0) & (ratio > 1.0 + clip_high)
    low = (advantages < 0) & (ratio < 1.0 - clip_low)
    return high.to(torch.int8) - low.to(torch.int8)
