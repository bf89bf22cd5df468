"""Turning per-token losses into one step loss that does not depend on how the step is split.

Every loss in this package computes a per-token tensor and hands it to `aggregate`. The
result is this micro-batch's *share* of the optimizer-step loss: summing the shares of all
micro-batches on all data-parallel ranks gives the step loss, whatever the split. That is
why the denominators are GLOBAL counts passed in by the caller, never counted here.

Shape legend (one layout per call, every per-token tensor has the same shape `[*]`):
    [B, S]   padded: one response per row, mask 0 on prompt and padding
    [1, T]   packed: several responses concatenated in one row (the Megatron backend)
    [*, K]   top-k tensors (GKD) add a trailing K axis

Aggregations:
    token_mean            sum_t m_t * l_t / num_tokens
    seq_mean_token_mean   sum_t m_t * l_t * w_t / num_seqs,   w_t = 1 / len(response of token t)
`w_t` ("seq_weights") makes the per-response mean a plain weighted sum, so it works for packed
rows where a row holds several responses. For padded rows it can be derived from the mask.

Masked positions must hold finite values (0 is fine): a masked NaN would still poison the sum
and its gradient, and checking would need a host sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import torch

Count = int | float | torch.Tensor
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


class AggregationArgs(TypedDict):
    """The keyword arguments every loss takes to turn per-token values into its share of the step mean
    (`aggregate`'s, passed on as `**agg`): declared once, built once per micro-batch by the objective."""

    aggregation: str
    num_tokens: Count
    num_seqs: Count | None
    seq_weights: torch.Tensor | None


def seq_weights_from_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Padded layout [B, S] -> per-token 1 / (masked tokens in the row), 0 where mask is 0.

    Only valid when each row is one response; packed rows need `seq_weights_from_lengths`.
    """
    m = mask.to(dtype)
    lengths = m.sum(dim=-1, keepdim=True).clamp(min=1.0)  # a fully masked row contributes nothing
    return m / lengths


def seq_weights_from_lengths(lengths: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed layout: responses of `lengths` tokens laid end to end -> [sum(lengths)] of 1/len_i.

    `lengths` count the tokens that carry mask 1 (the response span); a zero length adds nothing.
    """
    parts = [torch.full((int(n),), 1.0 / max(int(n), 1), dtype=dtype) for n in lengths]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str,
    num_tokens: Count | None = None,
    num_seqs: Count | None = None,
    seq_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """This micro-batch's share of the step mean of `values` (shape [*], same as `mask`).

    token_mean needs `num_tokens` (masked tokens in the whole step, all ranks); seq_mean_token_mean
    needs `num_seqs` (responses in the whole step) and `seq_weights` (per-token 1/len; derived
    from `mask` rows when None, which is right only for the padded layout).
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape")
    m = mask.to(values.dtype)
    if aggregation == "token_mean":
        if num_tokens is None:
            raise ValueError("aggregation='token_mean' needs num_tokens (global count of masked tokens in the step)")
        return (values * m).sum() / num_tokens
    if aggregation == "seq_mean_token_mean":
        if num_seqs is None:
            raise ValueError("aggregation='seq_mean_token_mean' needs num_seqs (global count of responses in the step)")
        w = seq_weights_from_mask(mask, values.dtype) if seq_weights is None else seq_weights
        if w.shape != values.shape:
            raise ValueError(f"seq_weights {tuple(w.shape)} must have the shape of values {tuple(values.shape)}")
        return (values * m * w.to(values.dtype)).sum() / num_seqs
    raise ValueError(f"aggregation={aggregation!r} is not allowed; choose one of {list(AGGREGATIONS)}")


def token_share(values: torch.Tensor, mask: torch.Tensor, num_tokens: Count) -> torch.Tensor:
    """Detached token-mean share of a metric (bools count as 0/1); sums over micro-batches to the step mean."""
    values = values.detach().to(torch.float32)
    return aggregate(values, mask, aggregation="token_mean", num_tokens=num_tokens)
