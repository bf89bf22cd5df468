"""Pure torch maths of every objective: advantages, clipped policy losses, TRRD, KL estimators,
distillation losses, and `build_objective`, which maps an algorithm config to them.

No Megatron, no torch.distributed, no host syncs: each loss takes the global token (or
response) count and returns `(loss_share, metrics)` with detached metric tensors, so the
same code runs in a unit test, a CPU run and a multi-node job. See docs/algorithms.md.
"""

from .advantages import group_advantages, zero_advantage_groups
from .aggregation import aggregate, seq_weights_from_lengths, seq_weights_from_mask
from .distill import gkd_loss, opd_advantage_term, sft_loss, topk_divergence
from .kl import incorrect_mask, kd_advantage_term, kd_coef_at, kd_loss, kl_estimator
from .objectives import Objective, build_objective
from .policy import clipped_policy_loss, policy_loss
from .trrd import trrd_log_ratio, trrd_loss

__all__ = [
    "Objective",
    "aggregate",
    "build_objective",
    "clipped_policy_loss",
    "gkd_loss",
    "group_advantages",
    "incorrect_mask",
    "kd_advantage_term",
    "kd_coef_at",
    "kd_loss",
    "kl_estimator",
    "opd_advantage_term",
    "policy_loss",
    "seq_weights_from_lengths",
    "seq_weights_from_mask",
    "sft_loss",
    "topk_divergence",
    "trrd_log_ratio",
    "trrd_loss",
    "zero_advantage_groups",
]
