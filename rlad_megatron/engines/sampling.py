"""Vectorised next-token sampling with per-row temperature, top-p, top-k and seed.

Randomness is counter-based: the uniform number of row b at generation step t is a hash of
(seed_b, t). A sample therefore depends only on its own seed and history, not on which other
sequences share the batch, which server ran it, or how often it was retried; the same seed
reproduces the same tokens everywhere. Tokens are drawn by inverse-CDF over the truncated
(top-k, top-p) temperature-scaled distribution: one uniform per row and a cumulative sum, so the
cost stays linear in the vocabulary with no per-token random numbers.

Returned log-probs: log_softmax(logits / temperature) of the chosen token, BEFORE truncation
(temperature 0 means greedy, with log_softmax(logits)); see engines/base.py.

Shapes: B rows, V vocab.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (murmur3 fmix32) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), [B] float64, a pure function of (seeds[b], steps[b])."""
    h = _mix32((seeds.to(torch.int64) & _M32) ^ 0x9E3779B9)
    h = _mix32(h ^ (steps.to(torch.int64) * 0x27D4EB2F & _M32))
    h2 = _mix32(h ^ 0x165667B1)  # 64 bits of randomness: two 32-bit draws
    return (h.to(torch.float64) * 4294967296.0 + h2.to(torch.float64) + 0.5) / 18446744073709551616.0


def truncation_mask(scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """True where a token survives top-k (k <= 0: off) and top-p (nucleus, keeps >= 1 token). [B, V]."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    keep_sorted = before < top_p[:, None]
    rank = torch.arange(scaled.shape[-1])[None, :]
    keep_sorted &= (top_k[:, None] <= 0) | (rank < top_k[:, None])
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seeds: torch.Tensor,
    steps: torch.Tensor,
    all_greedy: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; return (tokens [B] int64, logprobs [B] float32).

    logits [B, V] float32; temperature [B] (0 = greedy); top_p [B]; top_k [B] (-1 = off);
    seeds, steps [B] int64. all_greedy: the caller's knowledge that every temperature is 0 (None: check).
    """
    if all_greedy is None:
        all_greedy = bool((temperature <= 0).all())
    if all_greedy:  # the common eval / test case: no scaling, no randomness
        logprobs_all = logits.log_softmax(dim=-1)
        tokens = logits.max(dim=-1).indices
    else:
        greedy = temperature <= 0
        temp = torch.where(greedy, torch.ones_like(temperature), temperature)
        scaled = logits / temp[:, None]
        logprobs_all = scaled.log_softmax(dim=-1)
        probs = logprobs_all.exp()
        if bool(((top_p < 1.0) | (top_k > 0)).any()):
            probs = probs.masked_fill(~truncation_mask(scaled, top_p, top_k), 0.0)
        cdf = probs.to(torch.float64).cumsum(dim=-1)
        target = uniform_noise(seeds, steps)[:, None] * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
        tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    return tokens, logprobs_all.gather(-1, tokens[:, None]).squeeze(-1)
