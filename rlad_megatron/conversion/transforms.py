"""Named tensor transforms between Hugging Face and Megatron-Core layouts (pure torch, bit-exact).

Shape legend: ng = query groups (HF num_key_value_heads), hpg = query heads per group,
d = head_dim, H = hidden size, F = ffn hidden size, V = vocab, Vp = padded vocab, tp = TP size.

- QKV: Megatron keeps one `linear_qkv` whose rows are grouped per query group,
  [g0: q_0..q_{hpg-1}, k_0, v_0 | g1: ... ], i.e. `[ng * (hpg + 2) * d, H]` (bias: `[ng*(hpg+2)*d]`).
  Because the groups are contiguous, a dim-0 TP split hands every rank whole groups.
- gate/up: `linear_fc1` is `[gate; up]`, `[2F, H]`. A TP shard must hold its gate rows AND its up
  rows (`[gate_r; up_r]`), so its split is not a plain dim-0 chunk.
- vocab: the embedding / output layer have Vp >= V rows (Megatron pads to a multiple of TP);
  padded rows are zero on import and dropped on export.
- TP kinds: `replicated` (norms), `column` (dim 0: QKV, vocab), `row` (dim 1: linear_proj, fc2),
  `gate_up` (fc1).

Every function only reshapes, slices and concatenates, so HF -> Megatron -> HF is bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TP_KINDS = ("replicated", "column", "row", "gate_up")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """HF q `[ng*hpg*d, ...]`, k/v `[ng*d, ...]` -> Megatron grouped `[ng*(hpg+2)*d, ...]` (weights or biases)."""
    tail = q.shape[1:]
    qg = q.reshape(num_query_groups, -1, *tail)
    kg = k.reshape(num_query_groups, -1, *tail)
    vg = v.reshape(num_query_groups, -1, *tail)
    if kg.shape[1] != vg.shape[1] or qg.shape[1] % kg.shape[1]:
        raise ValueError(
            f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not form "
            f"{num_query_groups} query groups"
        )
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, num_query_groups: int, heads_per_group: int, head_dim: int):
    """Megatron grouped `[ng*(hpg+2)*d, ...]` -> HF (q `[ng*hpg*d, ...]`, k `[ng*d, ...]`, v `[ng*d, ...]`)."""
    tail = qkv.shape[1:]
    expected = num_query_groups * (heads_per_group + 2) * head_dim
    if qkv.shape[0] != expected:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected ng*(hpg+2)*d = {expected}")
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, *tail)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *tail).contiguous(), k.reshape(-1, *tail).contiguous(), v.reshape(-1, *tail).contiguous())


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate `[F, H]`, up `[F, H]` -> Megatron `linear_fc1` `[2F, H]`."""
    if gate.shape != up.shape:
        raise ValueError(f"gate_proj {tuple(gate.shape)} and up_proj {tuple(up.shape)} differ in shape")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor):
    """Megatron `linear_fc1` `[2F, H]` -> (gate `[F, H]`, up `[F, H]`)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_vocab_size: int) -> torch.Tensor:
    """`[V, H]` -> `[Vp, H]` with zero rows appended (padded tokens are never targets)."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocab {weight.shape[0]} is larger than the padded size {padded_vocab_size}")
    if extra == 0:
        return weight
    return torch.cat([weight, weight.new_zeros(extra, *weight.shape[1:])], dim=0)


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[Vp, H]` -> `[V, H]`."""
    if weight.shape[0] < vocab_size:
        raise ValueError(f"embedding has {weight.shape[0]} rows, fewer than vocab_size={vocab_size}")
    return weight[:vocab_size]


def tp_split(full: torch.Tensor, kind: str, tp: int) -> list[torch.Tensor]:
    """Full (TP=1) Megatron tensor -> `tp` contiguous shards, rank order."""
    if kind == "replicated" or tp == 1:
        return [full] * tp
    chunks: Sequence[torch.Tensor]
    if kind == "column":
        chunks = torch.chunk(full, tp, dim=0)
    elif kind == "row":
        chunks = torch.chunk(full, tp, dim=1)
    elif kind == "gate_up":
        gates, ups = (torch.chunk(x, tp, dim=0) for x in torch.chunk(full, 2, dim=0))
        chunks = [torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]
    else:
        raise ValueError(f"unknown TP kind {kind!r}; one of {TP_KINDS}")
    sizes = {tuple(c.shape) for c in chunks}
    if len(chunks) != tp or len(sizes) != 1:
        raise ValueError(f"a {kind} tensor of shape {tuple(full.shape)} does not split evenly over TP={tp}")
    # .contiguous(): gloo collectives silently send wrong data for non-contiguous views.
    return [c.contiguous() for c in chunks]


def tp_merge(shards: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Inverse of `tp_split`: rank-ordered shards -> full tensor."""
    if kind == "replicated" or len(shards) == 1:
        return shards[0]
    if kind == "column":
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "gate_up":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(f"unknown TP kind {kind!r}; one of {TP_KINDS}")
