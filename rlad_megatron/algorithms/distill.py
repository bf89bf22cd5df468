"""Distillation baselines: on-policy distillation (OPD), GKD top-k, offline SFT (docs/algorithms.md section 5).

OPD (sampled-token reverse KL as a per-token advantage, no discount):
    A_t = -opd_coef * (lp_old - lp_T)   [+ opd_reward_coef * GRPO group advantage]
then the ordinary clipped policy loss (policy.py) on those advantages.

GKD top-k: the teacher returns its top-k token ids and log-probs per position; the student's
log-probs at the same ids are gathered from its full-vocabulary log-softmax. Both are
renormalised over the k ids (p = teacher, q = student) and a divergence is taken per position:
    forward_kl   KL(p || q) = sum_k p (log p - log q)
    reverse_kl   KL(q || p) = sum_k q (log q - log p)
    jsd(beta)    beta * KL(p || m) + (1 - beta) * KL(q || m),   m = beta * p + (1 - beta) * q
The jsd convention is GKD's (and TRL's): beta = 0 is defined as forward KL and beta = 1 as
reverse KL, the limits of JSD(beta)/beta and JSD(beta)/(1 - beta). In between the value is the
unscaled JSD, which is at most ln 2 (its scale differs from the KLs'). The loss is the divergence aggregated over
response tokens of the student's own rollouts (a supervised loss; no advantage, no ratio).

SFT: masked negative log-likelihood of (teacher-generated, reward-filtered) responses.

Shape legend: per-token [*] (padded [B, S] or packed [1, T]); top-k [*, K].
Left out: full-vocabulary GKD (needs teacher logits in the trainer), temperature on the
top-k distributions, and GKD's mixing of off-policy data (lambda); rollouts are on-policy.
"""

from __future__ import annotations

import math

import torch

from .aggregation import Count, aggregate, token_share
from .policy import Metrics

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def opd_advantage_term(old_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, coef: float) -> torch.Tensor:
    """On-policy distillation per-token advantage -coef * (lp_old - lp_T) [*], detached."""
    return (-coef * (old_logprobs - teacher_logprobs)).detach()


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """sum_k a (log a - log b) over the last axis; terms with a = 0 are 0 (teacher may send -inf)."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a))
    return terms.sum(dim=-1)


def topk_divergence(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    divergence: str,
    jsd_beta: float = 0.5,
) -> torch.Tensor:
    """Per-position divergence [*] between the renormalised top-k distributions ([*, K] inputs)."""
    if student_topk_logprobs.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"student_topk_logprobs {tuple(student_topk_logprobs.shape)} and teacher_topk_logprobs "
            f"{tuple(teacher_topk_logprobs.shape)} must match: gather the student at the teacher's top-k ids"
        )
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not allowed; choose one of {list(DIVERGENCES)}")
    log_q = torch.log_softmax(student_topk_logprobs, dim=-1)
    log_p = torch.log_softmax(teacher_topk_logprobs.detach(), dim=-1)
    if divergence == "forward_kl" or (divergence == "jsd" and jsd_beta == 0.0):
        return _kl(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and jsd_beta == 1.0):
        return _kl(log_q, log_p)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(jsd_beta), log_q + math.log(1.0 - jsd_beta)]), dim=0)
    return jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)


def gkd_loss(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    divergence: str,
    jsd_beta: float = 0.5,
    aggregation: str,
    num_tokens: Count,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GKD top-k loss share; inputs [*, K], mask [*]. Metric `gkd_divergence` (token-mean share)."""
    per_token = topk_divergence(student_topk_logprobs, teacher_topk_logprobs, divergence=divergence, jsd_beta=jsd_beta)
    loss = aggregate(
        per_token, mask, aggregation=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, seq_weights=seq_weights
    )
    return loss, {"gkd_divergence": token_share(per_token, mask, num_tokens)}


def sft_loss(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str,
    num_tokens: Count,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Masked NLL share; logprobs [*] of the target tokens (with grad). Metric `nll` (token-mean share)."""
    loss = aggregate(
        -logprobs, mask, aggregation=aggregation, num_tokens=num_tokens, num_seqs=num_seqs, seq_weights=seq_weights
    )
    return loss, {"nll": token_share(-logprobs, mask, num_tokens)}
