"""Log-probs, entropy and top-k log-probs from vocab-parallel (TP-sharded) logits, no vocab gather.

Each TP rank holds logits for the vocabulary slice `[rank * V_local, (rank + 1) * V_local)` of the
padded vocabulary. With `z = logits / temperature` (the rollout engines' convention: log-probs of
the temperature-scaled distribution, before top-p / top-k):

    m       = max over the whole vocab of z              (all-reduce MAX, no gradient: it cancels)
    S       = sum_v exp(z_v - m)                          (all-reduce SUM of the local sums)
    log p_t = z_t - m - log S                             (z_t: all-reduce SUM of the masked local gather)
    H       = m + log S - (sum_v exp(z_v - m) z_v) / S

Autograd: `_SumOverTP` all-reduces in forward and passes the gradient through unchanged in
backward (every TP rank holds the same replicated loss, as in Megatron's
`reduce_from_tensor_model_parallel_region`), so each rank receives exactly the gradient of its
own logit slice. Columns at or beyond `vocab_size` (vocabulary padding) are excluded.

Shapes: `logits [..., V_local]`, `target_ids [...]` (global ids), `topk_ids [..., k]`; results
are float32 `[...]` / `[..., k]` (float64 for float64 logits). `tp_group=None` (or size 1) means the full vocabulary is local.

Chunked path (`chunked_logprobs`): the trainer does not let the model compute logits for the whole
packed row. It takes the final hidden states, keeps only the positions that carry a loss (response
positions), and runs output layer + softmax statistics over `chunk_size` positions at a time. Under
autograd each chunk is checkpointed (`torch.utils.checkpoint`, non-reentrant): forward keeps only the
chunk's hidden states, backward recomputes that chunk's logits, so neither pass holds fp32 logits
for more than one chunk (`chunk_size x V_local` floats). The chunk function holds TP collectives;
every TP rank runs the same chunks in the same order, so the recomputation in backward matches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


def _tp_size(tp_group) -> int:
    return 1 if tp_group is None else dist.get_world_size(tp_group)


def _tp_rank(tp_group) -> int:
    return 0 if tp_group is None else dist.get_rank(tp_group)


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """fp32 for half-precision logits; float64 stays float64 (exact comparisons in tests)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class _SumOverTP(torch.autograd.Function):
    """All-reduce SUM over the TP group; identity backward (the loss is replicated on TP ranks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, tp_group) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=tp_group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _sum_over_tp(tensor: torch.Tensor, tp_group) -> torch.Tensor:
    return tensor if _tp_size(tp_group) == 1 else _SumOverTP.apply(tensor, tp_group)


class _Shard:
    """The scaled valid logits of this rank and the softmax statistics over the whole vocabulary."""

    def __init__(self, logits: torch.Tensor, tp_group, vocab_size: int | None, temperature: float):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        local = logits.shape[-1]
        self.tp_group = tp_group
        self.start = _tp_rank(tp_group) * local
        total = vocab_size if vocab_size is not None else local * _tp_size(tp_group)
        valid = max(0, min(local, total - self.start))
        self.z = _at_least_fp32(logits[..., :valid]) / temperature  # [..., V_valid]
        self.max = self._global_max()  # [...]
        self.exp = torch.exp(self.z - self.max.unsqueeze(-1))  # [..., V_valid]
        self.sum_exp = _sum_over_tp(self.exp.sum(-1), tp_group)  # [...]
        self.log_norm = self.max + torch.log(self.sum_exp)  # [...] log sum_v exp(z_v)

    def _global_max(self) -> torch.Tensor:
        with torch.no_grad():
            if self.z.shape[-1]:
                local_max = self.z.max(dim=-1).values
            else:
                local_max = torch.full(self.z.shape[:-1], float("-inf"), dtype=self.z.dtype, device=self.z.device)
            if _tp_size(self.tp_group) > 1:
                dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=self.tp_group)
        return local_max

    def pick(self, ids: torch.Tensor) -> torch.Tensor:
        """z at global `ids` (any shape [..., *extra] matching z's leading dims), summed over TP."""
        local_ids = ids - self.start
        owned = (local_ids >= 0) & (local_ids < self.z.shape[-1])
        safe = torch.where(owned, local_ids, torch.zeros_like(local_ids))
        flat_z = self.z if self.z.shape[-1] else torch.zeros(*self.z.shape[:-1], 1, device=self.z.device)
        extra = ids.dim() - (self.z.dim() - 1)
        gathered = torch.gather(flat_z, -1, safe if extra else safe.unsqueeze(-1))
        gathered = gathered if extra else gathered.squeeze(-1)
        return _sum_over_tp(torch.where(owned, gathered, torch.zeros_like(gathered)), self.tp_group)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """log softmax(logits / temperature)[target] over the full vocab. [..., V_local], [...] -> [...]."""
    if _tp_size(tp_group) == 1:  # whole vocabulary local: torch's fused log_softmax is cheaper
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        z = _at_least_fp32(logits[..., :vocab_size])
        z = z / temperature if temperature != 1.0 else z
        return torch.log_softmax(z, dim=-1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    shard = _Shard(logits, tp_group, vocab_size, temperature)
    return shard.pick(target_ids) - shard.log_norm


def vocab_parallel_entropy(
    logits: torch.Tensor, tp_group=None, *, temperature: float = 1.0, vocab_size: int | None = None
) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) over the full vocab. [..., V_local] -> [...]."""
    shard = _Shard(logits, tp_group, vocab_size, temperature)
    weighted = _sum_over_tp((shard.exp * shard.z).sum(-1), tp_group)
    return shard.log_norm - weighted / shard.sum_exp


def vocab_parallel_topk_logprobs(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Student log-probs at given global ids (GKD). [..., V_local], [..., k] -> [..., k]."""
    shard = _Shard(logits, tp_group, vocab_size, temperature)
    return shard.pick(topk_ids) - shard.log_norm.unsqueeze(-1)


def logprobs_and_entropy(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
):
    """Both at once, sharing the softmax statistics. Returns (logprobs [...], entropy [...])."""
    shard = _Shard(logits, tp_group, vocab_size, temperature)
    weighted = _sum_over_tp((shard.exp * shard.z).sum(-1), tp_group)
    return shard.pick(target_ids) - shard.log_norm, shard.log_norm - weighted / shard.sum_exp


def _chunk_outputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    tp_group,
    temperature: float,
    vocab_size: int | None,
    with_entropy: bool,
):
    """Logits of one chunk (`hidden [c, H] @ weight[V_local, H].T`, fp32) -> (logprobs, entropy, topk)."""
    logits = _at_least_fp32(torch.matmul(hidden.to(weight.dtype), weight.t()))  # [c, V_local]
    entropy = None
    if _tp_size(tp_group) == 1:  # whole vocabulary local: one fused log_softmax, as the unchunked path
        z = logits[..., :vocab_size]
        log_probs = torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)
        logprobs = log_probs.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
        topk = None if topk_ids is None else log_probs.gather(-1, topk_ids)
        if with_entropy:
            with torch.no_grad():
                entropy = vocab_parallel_entropy(logits, temperature=temperature, vocab_size=vocab_size)
        return logprobs, entropy, topk
    shard = _Shard(logits, tp_group, vocab_size, temperature)
    logprobs = shard.pick(target_ids) - shard.log_norm
    if with_entropy:
        with torch.no_grad():  # monitoring only
            weighted = _sum_over_tp((shard.exp * shard.z).sum(-1), tp_group)
            entropy = shard.log_norm - weighted / shard.sum_exp
    topk = None if topk_ids is None else shard.pick(topk_ids) - shard.log_norm.unsqueeze(-1)
    return logprobs, entropy, topk


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    tp_group=None,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    topk_ids: torch.Tensor | None = None,
    with_entropy: bool = False,
) -> dict[str, torch.Tensor]:
    """Log-probs (and entropy, top-k log-probs) of `N` positions, `chunk_size` positions at a time.

    `hidden [N, H]`: final hidden states of the positions (replicated over TP); `weight [V_local, H]`:
    this TP rank's slice of the output layer; `target_ids [N]`, `topk_ids [N, k]`: global ids. Returns
    `{"logprobs": [N], "entropy": [N] (detached), "topk_logprobs": [N, k]}` (only those asked for).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts: dict[str, list[torch.Tensor]] = {"logprobs": [], "entropy": [], "topk_logprobs": []}
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        args = (
            hidden[start:end],
            weight,
            target_ids[start:end],
            None if topk_ids is None else topk_ids[start:end],
            tp_group,
            temperature,
            vocab_size,
            with_entropy,
        )
        if grad:
            logprobs, entropy, topk = checkpoint(_chunk_outputs, *args, use_reentrant=False)
        else:
            logprobs, entropy, topk = _chunk_outputs(*args)
        for key, value in (("logprobs", logprobs), ("entropy", entropy), ("topk_logprobs", topk)):
            if value is not None:
                parts[key].append(value)
    out = {}
    for key, values in parts.items():
        if values:
            out[key] = torch.cat(values)
        elif key == "logprobs" or (key == "entropy" and with_entropy):
            out[key] = hidden.new_zeros(0, dtype=torch.float32)
        elif key == "topk_logprobs" and topk_ids is not None:
            out[key] = hidden.new_zeros(0, topk_ids.shape[-1], dtype=torch.float32)
    return out
