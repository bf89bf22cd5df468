"""GRPO outcome advantages and zero-advantage group detection (docs/algorithms.md section 1).

    mu_g = mean_i r_i,  sigma_g = sqrt(mean_i (r_i - mu_g)^2)   (population std, over one group)
    A_i  = (r_i - mu_g) / (sigma_g + eps)    scale="std"   (GRPO)
    A_i  =  r_i - mu_g                       scale="none"  (Dr. GRPO: no std division)

Shape legend: N responses laid out group-contiguously (the G responses of prompt p are
rows p*G .. p*G+G-1), so rewards are [N] and groups are [N // G].

A group whose rewards are all equal has A = 0 for every response under both scales: it
carries no policy-gradient signal and, for TRRD, no teacher signal either. Dynamic sampling
(DAPO) drops such groups and samples replacements; `zero_advantage_groups` finds them.
Left out: per-batch (instead of per-group) normalisation and leave-one-out baselines.
"""

from __future__ import annotations

import torch

SCALES = ("std", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "pass all G responses of every prompt, group-contiguous"
        )
    return rewards.to(torch.float32).view(-1, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "std", eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantage [N] from rewards [N] (group-contiguous), float32, no gradient."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is not allowed; choose one of {list(SCALES)}")
    grouped = _grouped(rewards.detach(), group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        sigma = centred.pow(2).mean(dim=1, keepdim=True).sqrt()  # population std
        centred = centred / (sigma + eps)
    # Identical rewards must give exactly 0 (the mean of 0.1s is not exactly 0.1 in float,
    # and with a tiny sigma the rounding error would be blown up to a visible advantage).
    identical = (grouped.amax(dim=1) == grouped.amin(dim=1)).unsqueeze(1)
    return torch.where(identical, torch.zeros_like(centred), centred).reshape(-1)


def zero_advantage_groups(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [N // G] bool, fraction scalar): groups whose rewards are all identical.

    Exact equality (max == min) rather than a std threshold: rewards are usually a few
    discrete values, and "identical" is exactly the case where every advantage is 0.
    """
    grouped = _grouped(rewards.detach(), group_size)
    mask = grouped.amax(dim=1) == grouped.amin(dim=1)
    return mask, mask.to(torch.float32).mean()
