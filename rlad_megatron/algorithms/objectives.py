"""The one place that maps an algorithm name and its config to the maths.

    objective = build_objective(cfg.algorithm)       # grpo | kdrl | opd | gkd | sft | rlad
    objective.needs_teacher, objective.teacher_top_k, objective.needs_old_logprobs,
    objective.needs_ref, objective.uses_rewards, objective.required_batch_keys
    per_seq_advantages = objective.token_advantages(rewards, group_size, seq_lens=..., ...)
    loss, metrics = objective.loss(batch, num_tokens=..., num_seqs=..., step=...)

The training loop and the backends call only these; they never branch on algorithm names.

Batch contract of `Objective.loss` (one micro-batch). Every per-token tensor has the same
shape [*]: padded [B, S] (one response per row) or packed [1, T] (responses end to end, the
Megatron backend's layout). Values on positions with mask 0 must be finite (use 0).
    logprobs               float [*]     student log-probs of the sampled tokens, WITH grad
    mask                   bool  [*]     1 on response tokens that count, 0 on prompt / padding
    old_logprobs           float [*]     student log-probs before this update (no grad)
    advantages             float [*]     from token_advantages, laid out like logprobs
    teacher_logprobs       float [*]     teacher log-probs of the same tokens (student's ids)
    teacher_mask           bool  [*]     optional: tokens that get a teacher term (default: mask);
                                         built per response with `teacher_token_mask`
    seq_weights            float [*]     1 / len(response of the token) (aggregation.seq_weights_*);
                                         required when aggregation='seq_mean_token_mean'
    ref_logprobs           float [*]     reference-model log-probs (when needs_ref)
    rollout_logprobs       float [*]     the rollout engine's log-probs of the same tokens (when
                                         algorithm.tis_cap > 0: truncated importance weights)
    rewards                float [*]     the response's reward on each of its tokens (KDRL masking)
    student_topk_logprobs  float [*, K]  student log-probs at the teacher's top-k ids, WITH grad
    teacher_topk_logprobs  float [*, K]  teacher top-k log-probs (gkd)
`required_batch_keys` lists exactly what the configured objective reads. `num_tokens` is the
number of mask-1 tokens and `num_seqs` the number of responses in the whole optimizer step
(all micro-batches, all data-parallel ranks). The returned loss and every metric are this
micro-batch's share: summing them over micro-batches and ranks gives the step values.
Step-level constants (the KDRL beta) come from `step_scalars(step)` instead.

Token advantages: group advantages (GRPO) broadcast over each response, plus per-token terms:
OPD adds -opd_coef * (lp_old - lp_T) (its group term is weighted by opd_reward_coef, 0 by
default); KDRL with kd_estimator='k1' adds beta_t * (lp_T - lp_old). GKD and SFT return zeros.
Off-policy correction (algorithm.tis_cap > 0, objectives with a policy-gradient term): each token's
policy-gradient term is multiplied by w = min(exp(lp_old - lp_rollout), tis_cap) (off_policy.py),
logged as tis/weight_mean and tis/truncated_frac.
Left out: value functions (PPO critics) and process rewards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .advantages import group_advantages, zero_advantage_groups
from .aggregation import AggregationArgs
from .distill import gkd_loss, opd_advantage_term, sft_loss
from .kl import incorrect_mask, kd_advantage_term, kd_coef_at, kd_loss
from .off_policy import truncated_is_metrics, truncated_is_weights
from .policy import ClipArgs, Metrics, policy_loss
from .trrd import trrd_loss

__all__ = ["OBJECTIVES", "Objective", "build_objective", "zero_advantage_groups"]

PerSeq = Sequence[torch.Tensor | Sequence[float] | None] | torch.Tensor
"""Per-response values: one tensor or list of floats per response (None: a response this process does not hold),
or one packed 1-D tensor."""


def _split(values: PerSeq | None, seq_lens: Sequence[int], name: str) -> list[torch.Tensor]:
    """A list of per-response 1-D tensors, or one packed 1-D tensor [sum(seq_lens)] -> list."""
    if values is None:
        raise ValueError(f"{name} is needed by this objective's advantages; pass one tensor per response")
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.numel() != sum(seq_lens):
            raise ValueError(f"packed {name} must be 1-D with sum(seq_lens)={sum(seq_lens)} entries")
        return list(torch.split(values, list(seq_lens)))
    parts = [torch.as_tensor(v, dtype=torch.float32) for v in values]
    bad = [i for i, (v, n) in enumerate(zip(parts, seq_lens)) if v.numel() != n]
    if len(parts) != len(seq_lens) or bad:
        raise ValueError(f"{name} must hold one tensor of seq_lens[i] entries per response (mismatch at {bad[:5]})")
    return parts


def _missing(values: PerSeq | None, i: int) -> bool:
    """Whether response i's entry of a per-response list is None (not held by this process)."""
    return values is not None and not isinstance(values, torch.Tensor) and values[i] is None


def _subset(values: PerSeq | None, indices: Sequence[int], seq_lens: Sequence[int]) -> PerSeq | None:
    """The entries of responses `indices` (a packed tensor is split per response first)."""
    if values is None:
        return None
    per_seq = list(torch.split(values, list(seq_lens))) if isinstance(values, torch.Tensor) else values
    return [per_seq[i] for i in indices]


class Objective:
    """Base: GRPO. Subclasses override `_token_terms` (per-token advantage terms) and `_loss`."""

    name = "grpo"
    needs_teacher = False
    needs_old_logprobs = True
    uses_rewards = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.teacher_top_k = 0
        self.needs_ref = cfg.ref_kl_coef > 0 and self.needs_old_logprobs
        self.tis_cap = float(getattr(cfg, "tis_cap", None) or 0.0) if self.needs_old_logprobs else 0.0
        """Truncated importance weights against the rollout engine's log-probs when > 0 (the cap)."""
        self.required_batch_keys = self._required_keys()

    # -- what the loop needs --------------------------------------------------------------
    def _required_keys(self) -> tuple[str, ...]:
        keys = ["logprobs", "mask", "old_logprobs", "advantages"]
        if self.needs_ref:
            keys.append("ref_logprobs")
        if self.tis_cap > 0:
            keys.append("rollout_logprobs")
        return tuple(keys) + self._aggregation_keys()

    def _aggregation_keys(self) -> tuple[str, ...]:
        return ("seq_weights",) if self.cfg.aggregation == "seq_mean_token_mean" else ()

    def step_scalars(self, step: int) -> dict[str, float]:
        """Step-level constants worth logging (not shares; do not sum them)."""
        return {}

    def teacher_token_mask(self, seq_len: int, ends_with_eos: bool) -> torch.Tensor:
        """[seq_len] bool: response tokens that get a teacher term (drops the final EOS if configured)."""
        keep = torch.ones(seq_len, dtype=torch.bool)
        if self.cfg.drop_final_eos_from_teacher and ends_with_eos and seq_len > 0:
            keep[-1] = False
        return keep

    # -- advantages -----------------------------------------------------------------------
    def token_advantages(
        self,
        rewards: torch.Tensor | None,
        group_size: int,
        *,
        seq_lens: Sequence[int],
        old_logprobs: PerSeq | None = None,
        teacher_logprobs: PerSeq | None = None,
        ends_with_eos: Sequence[bool] | None = None,
        step: int = 0,
    ) -> list[torch.Tensor | None]:
        """Per-response advantage tensors [len_i] (float32, detached) for N responses.

        rewards [N] group-contiguous (may be None when `uses_rewards` is False); seq_lens [N];
        old_logprobs / teacher_logprobs: N tensors [len_i] or one packed tensor [sum len_i];
        ends_with_eos [N]: whether response i ends with EOS (for drop_final_eos_from_teacher).
        An entry of None in old_logprobs / teacher_logprobs: this process does not hold that response's
        values (another data-parallel rank trains on it); when the objective has per-token terms, its
        advantages are then None too, and every other response's are unchanged (each response's terms read
        only its own values and reward; the group term reads only rewards).
        """
        seq_lens = [int(n) for n in seq_lens]
        seq_adv = self._seq_advantages(rewards, group_size, len(seq_lens))
        out = [seq_adv[i].expand(n).clone() for i, n in enumerate(seq_lens)]
        held = [i for i in range(len(seq_lens)) if not _missing(old_logprobs, i) and not _missing(teacher_logprobs, i)]
        every = len(held) == len(seq_lens)
        terms = self._token_terms(
            rewards if every or rewards is None else torch.as_tensor(rewards)[held],
            [seq_lens[i] for i in held],
            old_logprobs if every else _subset(old_logprobs, held, seq_lens),
            teacher_logprobs if every else _subset(teacher_logprobs, held, seq_lens),
            step,
        )
        advantages: list[torch.Tensor | None] = list(out)
        if terms is None:
            return advantages
        eos = list(ends_with_eos) if ends_with_eos is not None else [False] * len(seq_lens)
        advantages = [None] * len(seq_lens)
        for i, t in zip(held, terms):
            mask = self.teacher_token_mask(seq_lens[i], eos[i]).to(t.device)
            advantages[i] = out[i].to(t.device) + t.to(torch.float32) * mask
        return advantages

    def _seq_weight_of_group_term(self) -> float:
        return 1.0

    def _seq_advantages(self, rewards: torch.Tensor | None, group_size: int, num_seqs: int) -> torch.Tensor:
        weight = self._seq_weight_of_group_term()
        if weight == 0.0:
            return torch.zeros(num_seqs, dtype=torch.float32)
        if rewards is None:
            raise ValueError(f"algorithm '{self.name}' needs rewards to compute advantages")
        rewards = torch.as_tensor(rewards, dtype=torch.float32)
        if rewards.numel() != num_seqs:
            raise ValueError(f"rewards has {rewards.numel()} entries but seq_lens has {num_seqs}")
        adv = group_advantages(rewards, group_size, scale=self.cfg.advantage_scale, eps=self.cfg.advantage_eps)
        return weight * adv

    def _token_terms(self, rewards, seq_lens, old_logprobs, teacher_logprobs, step) -> list[torch.Tensor] | None:
        return None

    # -- loss -----------------------------------------------------------------------------
    def loss(
        self, batch: Mapping[str, torch.Tensor], *, num_tokens: Any, num_seqs: Any = None, step: int = 0
    ) -> tuple[torch.Tensor, Metrics]:
        """This micro-batch's loss share and metric shares; see the module docstring for `batch`."""
        missing = [k for k in self.required_batch_keys if batch.get(k) is None]
        if missing:
            raise ValueError(
                f"algorithm '{self.name}' needs batch keys {missing}; it reads {list(self.required_batch_keys)}"
            )
        agg = AggregationArgs(
            aggregation=self.cfg.aggregation,
            num_tokens=num_tokens,
            num_seqs=num_seqs,
            seq_weights=batch.get("seq_weights"),
        )
        if self.tis_cap <= 0:
            return self._loss(batch, agg, step)
        weights, truncated = truncated_is_weights(batch["old_logprobs"], batch["rollout_logprobs"], self.tis_cap)
        loss, metrics = self._loss({**batch, "is_weights": weights}, agg, step)
        metrics.update(truncated_is_metrics(weights, truncated, batch["mask"].bool(), num_tokens))
        return loss, metrics

    def _teacher_tokens(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["mask"].bool()
        teacher_mask = batch.get("teacher_mask")
        return mask if teacher_mask is None else mask & teacher_mask.bool()

    def _clip_args(self, batch: Mapping[str, torch.Tensor]) -> ClipArgs:
        cfg = self.cfg
        return ClipArgs(
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            ref_logprobs=batch.get("ref_logprobs"),
            ref_kl_coef=cfg.ref_kl_coef,
            ref_kl_estimator=cfg.ref_kl_estimator,
            is_weights=batch.get("is_weights"),
        )

    def _loss(self, batch: Mapping[str, torch.Tensor], agg: AggregationArgs, step: int) -> tuple[torch.Tensor, Metrics]:
        b = batch
        return policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], **self._clip_args(b), **agg)


class RLADObjective(Objective):
    """TRRD: the teacher moves the PPO anchor (trrd.py)."""

    name = "rlad"
    needs_teacher = True

    def _required_keys(self) -> tuple[str, ...]:
        return super()._required_keys() + ("teacher_logprobs",)

    def _loss(self, batch: Mapping[str, torch.Tensor], agg: AggregationArgs, step: int) -> tuple[torch.Tensor, Metrics]:
        b, cfg = batch, self.cfg
        return trrd_loss(
            b["logprobs"],
            b["old_logprobs"],
            b["teacher_logprobs"],
            b["advantages"],
            b["mask"],
            alpha=cfg.alpha,
            teacher_log_ratio_clamp=cfg.teacher_log_ratio_clamp,
            clamp_mode=cfg.clamp_mode,
            teacher_mask=b.get("teacher_mask"),
            **self._clip_args(b),
            **agg,
        )


class KDRLObjective(Objective):
    """GRPO + beta * reverse KL to the teacher: k2/k3 as a loss, k1 as an advantage term."""

    name = "kdrl"
    needs_teacher = True

    def _required_keys(self) -> tuple[str, ...]:
        keys = super()._required_keys()
        if self.cfg.kd_estimator != "k1":
            keys += ("teacher_logprobs",) + (("rewards",) if self.cfg.kd_reward_mask else ())
        return keys

    def step_scalars(self, step: int) -> dict[str, float]:
        return {"kd_coef": kd_coef_at(step, self.cfg)}

    def _token_terms(self, rewards, seq_lens, old_logprobs, teacher_logprobs, step):
        if self.cfg.kd_estimator != "k1":
            return None
        olds = _split(old_logprobs, seq_lens, "old_logprobs")
        teachers = _split(teacher_logprobs, seq_lens, "teacher_logprobs")
        terms = [kd_advantage_term(o, t, kd_coef_at(step, self.cfg)) for o, t in zip(olds, teachers)]
        if self.cfg.kd_reward_mask:
            if rewards is None:
                raise ValueError("algorithm.kd_reward_mask=True needs rewards in token_advantages")
            keep = incorrect_mask(torch.as_tensor(rewards, dtype=torch.float32), self.cfg.correct_reward_threshold)
            terms = [t * keep[i].to(t.device, t.dtype) for i, t in enumerate(terms)]
        return terms

    def _loss(self, batch: Mapping[str, torch.Tensor], agg: AggregationArgs, step: int) -> tuple[torch.Tensor, Metrics]:
        loss, metrics = super()._loss(batch, agg, step)
        if self.cfg.kd_estimator == "k1":
            return loss, metrics
        correct = None
        if self.cfg.kd_reward_mask:  # "rewards" is then a required batch key
            correct = ~incorrect_mask(batch["rewards"], self.cfg.correct_reward_threshold)
        kd, kd_metrics = kd_loss(
            batch["logprobs"],
            batch["teacher_logprobs"],
            self._teacher_tokens(batch),
            kind=self.cfg.kd_estimator,
            coef=kd_coef_at(step, self.cfg),
            correct=correct,
            **agg,
        )
        metrics.update(kd_metrics, kd_loss=kd.detach())
        return loss + kd, metrics


class OPDObjective(Objective):
    """On-policy distillation: per-token advantage -coef * (lp_old - lp_T), policy loss on top."""

    name = "opd"
    needs_teacher = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.uses_rewards = cfg.opd_reward_coef > 0

    def _seq_weight_of_group_term(self) -> float:
        return float(self.cfg.opd_reward_coef)

    def _token_terms(self, rewards, seq_lens, old_logprobs, teacher_logprobs, step):
        olds = _split(old_logprobs, seq_lens, "old_logprobs")
        teachers = _split(teacher_logprobs, seq_lens, "teacher_logprobs")
        return [opd_advantage_term(o, t, self.cfg.opd_coef) for o, t in zip(olds, teachers)]


class _SupervisedObjective(Objective):
    """Supervised losses on responses: no ratio, no advantages, no rewards."""

    needs_old_logprobs = False
    uses_rewards = False

    def _seq_weight_of_group_term(self) -> float:
        return 0.0


class GKDObjective(_SupervisedObjective):
    """Supervised top-k divergence to the teacher on the student's rollouts."""

    name = "gkd"
    needs_teacher = True

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.teacher_top_k = int(cfg.gkd_top_k)

    def _required_keys(self) -> tuple[str, ...]:
        return ("mask", "student_topk_logprobs", "teacher_topk_logprobs") + self._aggregation_keys()

    def _loss(self, batch: Mapping[str, torch.Tensor], agg: AggregationArgs, step: int) -> tuple[torch.Tensor, Metrics]:
        return gkd_loss(
            batch["student_topk_logprobs"],
            batch["teacher_topk_logprobs"],
            self._teacher_tokens(batch),
            divergence=self.cfg.gkd_divergence,
            jsd_beta=self.cfg.gkd_jsd_beta,
            **agg,
        )


class SFTObjective(_SupervisedObjective):
    """Offline distillation: masked NLL of teacher-generated, reward-filtered responses."""

    name = "sft"

    def _required_keys(self) -> tuple[str, ...]:
        return ("logprobs", "mask") + self._aggregation_keys()

    def _loss(self, batch: Mapping[str, torch.Tensor], agg: AggregationArgs, step: int) -> tuple[torch.Tensor, Metrics]:
        return sft_loss(batch["logprobs"], batch["mask"], **agg)


OBJECTIVES = {
    "grpo": Objective,
    "rlad": RLADObjective,
    "kdrl": KDRLObjective,
    "opd": OPDObjective,
    "gkd": GKDObjective,
    "sft": SFTObjective,
}


def build_objective(cfg: Any) -> Objective:
    """The objective for an AlgorithmConfig (anything with its fields)."""
    if cfg.name not in OBJECTIVES:
        raise ValueError(f"algorithm.name={cfg.name!r} is not allowed; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[cfg.name](cfg)
