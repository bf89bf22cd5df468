"""Sequence packing and dynamic micro-batching of variable-length samples (prompt + response).

A sample of `P` prompt and `R` response tokens becomes `L - 1` input positions (`L = P + R`):
input `ids[:-1]`, target `ids[1:]`. Response token `j` is the target at position `P - 1 + j`,
so per-token values of the response (advantages, old / teacher / ref log-probs, ...) land on
positions `P - 1 .. L - 2` and `mask` is 1 exactly there.

Packing: samples are laid end to end in one row (`[1, T]`); `cu_seqlens` marks the boundaries
so attention never crosses a sequence (Megatron's `thd` PackedSeqParams) and RoPE positions
restart per sequence. The row is padded at the end (a padding "sequence" with mask 0) to a
multiple of `pad_to_multiple` (`token_multiple`: TP under sequence parallelism, 16 more under FP8)
or to a fixed length (pipeline parallelism needs one activation shape for all micro-batches).
Padding carries no loss and, attending only to itself, changes no real token's log-prob.

Micro-batching: first-fit-decreasing by length into bins of `micro_batch_tokens` tokens; a sample
longer than the budget gets a bin of its own. `split_for_data_parallel` first deals samples to
data-parallel ranks, longest first, to the rank with the fewest tokens (deterministic, so every
TP / PP rank of a DP replica computes the same packs).

Batch keys follow `rlad_megatron.algorithms` (one spelling per concept): `tokens, position_ids,
targets, mask, seq_weights` plus the per-token keys given by the caller (`advantages,
old_logprobs, teacher_logprobs, ref_logprobs, rollout_logprobs`) and, for GKD,
`teacher_topk_ids` / `teacher_topk_logprobs` `[1, T, K]`; with routing replay (`routes=True`),
`routed_experts` `[1, T, layers, k]` int16: the rollout engine's experts of the token at each input
position (-1 on padding; backends/megatron/routing_replay.py).

Context parallelism (CP ranks share one packed row): `pack_samples(pad_sequences_to=2 * CP)` pads
every sequence to a multiple of 2*CP (the pad positions carry no loss and, being after the real
tokens of their sequence, change no real token's log-prob); `shard_for_context_parallel` then cuts
each sequence into 2*CP equal chunks and gives rank r chunks r and 2*CP-1-r (causal attention costs
grow along a sequence: this pairing balances them), sharding every per-token column the same way.
`cu_seqlens` stays the global padded boundaries (what RoPE and attention divide by CP).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlad_megatron.types import Sample


@dataclass
class PackedBatch:
    """One packed micro-batch. Tensors are `[1, T]` unless noted."""

    tensors: dict[str, torch.Tensor]
    cu_seqlens: torch.Tensor
    """int32 `[num_sequences + 1]` boundaries (the padding tail counts as one sequence)."""
    max_seqlen: int
    sample_indices: list[int]
    """Index (into the list given to `pack_samples`) of each packed sample, in row order."""
    response_spans: list[tuple[int, int]] = field(default_factory=list)
    """`[start, end)` positions in the row of each sample's response targets."""
    cp_positions: torch.Tensor | None = None
    """Under context parallelism: the positions in the whole row of this rank's tokens (None: whole row)."""

    @property
    def num_tokens(self) -> int:
        return int(self.tensors["tokens"].shape[1])

    def to(self, device: torch.device) -> PackedBatch:
        """A copy with every tensor on `device` (the model's)."""
        moved = {k: v.to(device, non_blocking=True) for k, v in self.tensors.items()}
        return PackedBatch(
            tensors=moved,
            cu_seqlens=self.cu_seqlens.to(device),
            max_seqlen=self.max_seqlen,
            sample_indices=self.sample_indices,
            response_spans=self.response_spans,
            cp_positions=self.cp_positions,
        )

    @property
    def row_tokens(self) -> int:
        """Tokens of the whole packed row (over all context-parallel ranks)."""
        return int(self.cu_seqlens[-1])


def sequence_length(sample: Sample) -> int:
    """Input positions a sample occupies: prompt + response - 1."""
    return len(sample.prompt_ids) + len(sample.response_ids) - 1


def _check_sample(index: int, sample: Sample) -> None:
    if len(sample.prompt_ids) == 0:
        raise ValueError(f"sample {index} has an empty prompt_ids; every sample needs at least one prompt token")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to <= capacity (an oversized item gets its own bin)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[index]
        for b, load in enumerate(loads):
            if load + size <= capacity:
                bins[b].append(index)
                loads[b] += size
                break
        else:
            bins.append([index])
            loads.append(size)
    return [sorted(b) for b in bins]


def split_for_data_parallel(samples: Sequence[Sample], data_parallel_size: int) -> list[list[int]]:
    """Indices of the samples each DP rank trains on, balanced by token count."""
    shards: list[list[int]] = [[] for _ in range(data_parallel_size)]
    loads = [0] * data_parallel_size
    order = sorted(range(len(samples)), key=lambda i: (-sequence_length(samples[i]), i))
    for index in order:
        rank = min(range(data_parallel_size), key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += sequence_length(samples[index])
    return [sorted(s) for s in shards]


FP8_TOKEN_MULTIPLE = 16
"""Transformer Engine's FP8 Linear / LayerNormLinear forward asserts (`assert_dim_for_fp8_exec`) that the
tokens of its input are a multiple of 8 and the hidden size of 16; FP8 GEMMs want 16 on every dimension
(tokens are the inner dimension of the weight-gradient GEMM), so rows are padded to 16."""


def token_multiple(tensor_model_parallel_size: int, sequence_parallel: bool, fp8: bool) -> int:
    """What every packed row's length must be a multiple of.

    Sequence parallelism splits the row over TP ranks, so it must divide by TP; under FP8 each rank's
    Linear layers see that shard (T / TP tokens), so the shard itself must divide by 16: 16 x TP."""
    shards = tensor_model_parallel_size if sequence_parallel else 1
    return shards * (FP8_TOKEN_MULTIPLE if fp8 else 1)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def local_positions(length: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Positions (within a sequence of `length`, a multiple of 2*CP) held by `cp_rank`: chunks r, 2*CP-1-r."""
    chunk = length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk, device=device)
    return torch.cat([first, second])


def context_parallel_gather_order(global_lengths: list[int], cp_size: int) -> torch.Tensor:
    """Index into the rank-major all-gather of the local rows that puts its tokens in global row order."""
    local_total = sum(global_lengths) // cp_size
    where = torch.empty(sum(global_lengths), dtype=torch.long)
    global_start = local_start = 0
    for length in global_lengths:
        for rank in range(cp_size):
            held = local_positions(length, cp_size, rank) + global_start
            where[held] = rank * local_total + local_start + torch.arange(length // cp_size)
        global_start += length
        local_start += length // cp_size
    return where


def context_parallel_positions(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in the whole row that `cp_rank` holds, in its local order (sequence by sequence)."""
    bounds = cu_seqlens.tolist()
    return torch.cat([local_positions(b - a, cp_size, cp_rank) + a for a, b in itertools.pairwise(bounds)])


def shard_for_context_parallel(batch: PackedBatch, cp_size: int, cp_rank: int) -> PackedBatch:
    """This CP rank's part of a packed row: chunks r and 2*CP-1-r of every sequence, every column alike."""
    bounds = batch.cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    if any(n % (2 * cp_size) for n in lengths):
        raise ValueError(
            f"sequence lengths {lengths} are not multiples of 2 x context_parallel_size={2 * cp_size}; "
            "pack with pad_sequences_to=2 * context_parallel_size"
        )
    positions = context_parallel_positions(batch.cu_seqlens, cp_size, cp_rank)
    return PackedBatch(
        tensors={k: v.index_select(1, positions) for k, v in batch.tensors.items()},
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        sample_indices=batch.sample_indices,
        response_spans=batch.response_spans,
        cp_positions=positions,
    )


def pack_samples(
    samples: Sequence[Sample],
    per_token: Mapping[str, Sequence[Sequence[float]]] | None = None,
    *,
    pad_to_multiple: int = 1,
    pad_to_length: int = 0,
    topk: bool = False,
    pad_sequences_to: int = 1,
    routes: bool = False,
) -> PackedBatch:
    """Pack samples into one row. `per_token[key][i]` holds one value per response token of sample i.

    `pad_sequences_to`: every sequence is padded to a multiple of it (context parallelism); `routes`: add
    the samples' `routed_experts` as a per-position column."""
    per_token = per_token or {}
    lengths = [_round_up(sequence_length(s), pad_sequences_to) for s in samples]
    total = sum(lengths)
    padded = max(_round_up(max(total, 1), pad_to_multiple), pad_to_length)
    if pad_to_length and total > pad_to_length:
        raise ValueError(f"packed length {total} exceeds pad_to_length={pad_to_length}")
    cols = {k: torch.zeros(padded, dtype=torch.long) for k in ("tokens", "targets", "position_ids")}
    floats = {k: torch.zeros(padded) for k in ("mask", "seq_weights", *per_token)}
    topk_cols = _topk_buffers(samples, padded) if topk else {}
    route_col = _routes_buffer(samples, padded) if routes else None
    spans, offset, bounds = [], 0, [0]
    for i, (sample, length) in enumerate(zip(samples, lengths)):
        _check_sample(i, sample)
        # lists of Python ints, or int32 arrays on the ranks that received them (components.broadcast_samples)
        ids = torch.from_numpy(
            np.concatenate([np.asarray(c, dtype=np.int64) for c in (sample.prompt_ids, sample.response_ids)])
        )
        real = len(ids) - 1
        cols["tokens"][offset : offset + real] = ids[:-1]
        cols["targets"][offset : offset + real] = ids[1:]
        cols["position_ids"][offset : offset + length] = torch.arange(length)
        start, n_resp = offset + len(sample.prompt_ids) - 1, len(sample.response_ids)
        floats["mask"][start : start + n_resp] = 1.0
        floats["seq_weights"][start : start + n_resp] = 1.0 / max(n_resp, 1)
        for key, values in per_token.items():
            _fill(floats[key], start, values[i], n_resp, key, i)
        _fill_topk(topk_cols, start, sample, n_resp)
        if route_col is not None:
            route_col[offset : offset + real] = torch.from_numpy(np.asarray(sample.routed_experts, dtype=np.int16))
        spans.append((start, start + n_resp))
        offset += length
        bounds.append(offset)
    if padded > offset:
        bounds.append(padded)  # the padding tail attends only to itself
    extra = {"routed_experts": route_col} if route_col is not None else {}
    tensors = {k: v.unsqueeze(0) for k, v in {**cols, **floats, **topk_cols, **extra}.items()}
    seqlens = [b - a for a, b in itertools.pairwise(bounds)]
    return PackedBatch(
        tensors=tensors,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=max(seqlens),
        sample_indices=list(range(len(samples))),
        response_spans=spans,
    )


def _fill(buffer: torch.Tensor, start: int, values: Sequence[float] | None, n_resp: int, key: str, i: int) -> None:
    if values is None:
        raise ValueError(f"sample {i} has no {key}; it is required by the objective")
    if len(values) != n_resp:
        raise ValueError(f"sample {i}: {key} has {len(values)} values for {n_resp} response tokens")
    buffer[start : start + n_resp] = torch.as_tensor(values, dtype=torch.float32)


def _topk_buffers(samples: Sequence[Sample], padded: int) -> dict[str, torch.Tensor]:
    k = max(
        (
            np.shape(s.teacher_topk_ids)[-1]
            for s in samples
            if s.teacher_topk_ids is not None and len(s.teacher_topk_ids)
        ),
        default=0,
    )
    if k == 0:
        raise ValueError("top-k distillation needs sample.teacher_topk_ids; the teacher returned none")
    return {
        "teacher_topk_ids": torch.zeros(padded, k, dtype=torch.long),
        "teacher_topk_logprobs": torch.zeros(padded, k),
    }


def _routes_buffer(samples: Sequence[Sample], padded: int) -> torch.Tensor:
    """A -1-filled int16 [padded, layers, k] column, after checking every sample carries routes of one shape
    covering its fed tokens (prompt + response - 1)."""
    shape = None
    for i, sample in enumerate(samples):
        got = sample.routed_experts
        if got is None:
            raise ValueError(
                f"sample {i} has no routed_experts; model.routing_replay needs rollouts from an engine that returns "
                "them (the embedded engine, rlad serve, or SGLang started with --enable-return-routed-experts)"
            )
        want = len(sample.prompt_ids) + len(sample.response_ids) - 1
        if np.ndim(got) != 3 or len(got) != want or (shape is not None and np.shape(got)[1:] != shape):
            raise ValueError(
                f"sample {i}: routed_experts has shape {np.shape(got)}; expected [{want}, layers, k] "
                f"(prompt + response - 1 tokens{'' if shape is None else f', layers and k {shape} as the others'})"
            )
        shape = np.shape(got)[1:]
    if shape is not None and np.iinfo(np.int16).max < max(
        int(np.max(s.routed_experts, initial=0)) for s in samples if s.routed_experts is not None
    ):
        raise ValueError("routed_experts ids exceed int16; more than 32767 experts are not supported")
    return torch.full((padded, *(shape or (0, 0))), -1, dtype=torch.int16)


def _fill_topk(cols: dict[str, torch.Tensor], start: int, sample: Sample, n_resp: int) -> None:
    if not cols:
        return
    ids: Any = sample.teacher_topk_ids if sample.teacher_topk_ids is not None else []
    lps: Any = sample.teacher_topk_logprobs if sample.teacher_topk_logprobs is not None else []
    if len(ids) != n_resp or len(lps) != n_resp:
        raise ValueError(f"teacher top-k lists cover {len(ids)} positions for {n_resp} response tokens")
    cols["teacher_topk_ids"][start : start + n_resp] = torch.as_tensor(ids, dtype=torch.long)
    cols["teacher_topk_logprobs"][start : start + n_resp] = torch.as_tensor(lps, dtype=torch.float32)


def make_micro_batches(
    samples: Sequence[Sample],
    per_token: Mapping[str, Sequence[Sequence[float]]] | None,
    micro_batch_tokens: int,
    *,
    pad_to_multiple: int = 1,
    uniform_length: bool = False,
    topk: bool = False,
    pad_sequences_to: int = 1,
    pad_to_length: int = 0,
    routes: bool = False,
) -> list[PackedBatch]:
    """Dynamic micro-batches by token budget; `sample_indices` refer to `samples`.

    `uniform_length`: every batch padded to the longest (at least `pad_to_length`)."""
    per_token = per_token or {}
    lengths = [_round_up(sequence_length(s), pad_sequences_to) for s in samples]
    bins = first_fit_decreasing(lengths, micro_batch_tokens)
    pad_len = _round_up(max((sum(lengths[i] for i in b) for b in bins), default=1), pad_to_multiple)
    pad_len = max(pad_len, pad_to_length)
    batches = []
    for indices in bins:
        sub = {k: [v[i] for i in indices] for k, v in per_token.items()}
        batch = pack_samples(
            [samples[i] for i in indices],
            sub,
            pad_to_multiple=pad_to_multiple,
            pad_to_length=pad_len if uniform_length else 0,
            topk=topk,
            pad_sequences_to=pad_sequences_to,
            routes=routes,
        )
        batch.sample_indices = list(indices)
        batches.append(batch)
    return batches


def filler_batch(like: PackedBatch) -> PackedBatch:
    """A batch shaped like `like` that contributes nothing: no samples, mask and weights zero."""
    tensors = {k: v.clone() for k, v in like.tensors.items()}
    for key in ("mask", "seq_weights"):
        tensors[key].zero_()
    if "routed_experts" in tensors:
        tensors["routed_experts"].fill_(-1)  # no engine routes: not counted in the routing agreement
    return PackedBatch(
        tensors=tensors, cu_seqlens=like.cu_seqlens.clone(), max_seqlen=like.max_seqlen, sample_indices=[]
    )


def pad_samples(samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Padded layout `[B, S]` (one sample per row, right padding) for reference computations."""
    width = max(sequence_length(s) for s in samples)
    rows = [pack_samples([s], pad_to_length=width) for s in samples]
    return {k: torch.cat([r.tensors[k] for r in rows]) for k in ("tokens", "targets", "position_ids", "mask")}
