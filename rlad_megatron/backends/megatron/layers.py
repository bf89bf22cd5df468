"""Layer-spec pieces for Megatron's local (non-Transformer-Engine) spec: SDPA attention and norms.

`SDPACoreAttention` replaces Megatron's `DotProductAttention`, which allocates with
`torch.cuda.current_device()` and rejects packed sequences. It calls torch
`scaled_dot_product_attention` (causal, GQA via `enable_gqa`) and supports Megatron's two layouts:
- `sbhd` (no `packed_seq_params`): query/key/value `[s, b, heads, head_dim]` -> out `[s, b, heads*head_dim]`
- `thd` (packed sequences, `packed_seq_params.qkv_format == "thd"`): `[t, heads, head_dim]` with
  `cu_seqlens_q`; attention runs per sequence, so it never crosses sequence boundaries
  -> out `[t, heads, head_dim]` (Megatron's attention reshapes it to `[t, 1, h]`).
- `thd` under context parallelism (CP > 1): the row holds this CP rank's two chunks of every
  sequence (`batching.shard_for_context_parallel`: chunks r and 2*CP-1-r of 2*CP, `cu_seqlens_q` the
  global, padded boundaries). Keys and values are all-gathered over the CP group (Megatron's
  `cp_comm_type="all_gather"` scheme; backward reduce-scatters their gradients), put back in
  sequence order, and each local query attends to the keys at or before its global position within
  its own sequence (an explicit causal mask, since the query chunks are not contiguous).

`SPNorm` builds torch RMSNorm / LayerNorm and marks its parameters `sequence_parallel` so that
Megatron all-reduces their gradients over the TP group under sequence parallelism (Megatron's
`WrappedTorchNorm` asserts `not config.sequence_parallel`). `QKNorm` is the same norm for Qwen3's
per-head QK-norm: Megatron finds it by name (`q_layernorm` / `k_layernorm`) and sums its grads.

Left out: attention dropout (RL/distillation fine-tuning uses 0), attention bias, sliding windows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from rlad_megatron.backends.megatron.batching import context_parallel_gather_order, local_positions


class SDPACoreAttention(MegatronModule):
    """Core attention through torch SDPA; constructor signature of Megatron's DotProductAttention."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(config=config)
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if self.cp_group is None and config.context_parallel_size > 1:
            from megatron.core import parallel_state as mpu

            self.cp_group = mpu.get_context_parallel_group()
        self.cp_size = config.context_parallel_size
        self.softmax_scale = softmax_scale
        self.gqa = config.num_query_groups is not None and config.num_query_groups != config.num_attention_heads

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, hq, s, d], k/v [b, hkv, s, d] -> [b, hq, s, d]."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=self.gqa)

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if attention_bias is not None:
            raise ValueError("SDPACoreAttention does not support attention_bias")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if self.cp_size > 1:
                return self._forward_thd_context_parallel(query, key, value, packed_seq_params.cu_seqlens_q)
            return self._forward_thd(query, key, value, packed_seq_params.cu_seqlens_q)
        if self.cp_size > 1:
            raise ValueError("context parallelism needs packed (thd) batches; pass packed_seq_params")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [s,b,h,d] -> [b,h,s,d]
        out = self._attend(q, k, v)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    def _forward_thd(self, query, key, value, cu_seqlens: torch.Tensor) -> torch.Tensor:
        # torch.split, not slicing: the backward of a slice zero-fills a full-size gradient per
        # sequence, the backward of split concatenates once.
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        outs = []
        for q, k, v in zip(*(torch.split(x, lengths) for x in (query, key, value))):
            if q.shape[0] == 0:
                outs.append(q)
                continue
            q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))  # [len,h,d] -> [1,h,len,d]
            outs.append(self._attend(q, k, v)[0].permute(1, 0, 2))  # [len, h, d]
        return torch.cat(outs, dim=0)

    def _forward_thd_context_parallel(self, query, key, value, cu_seqlens: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

        cp, rank = self.cp_size, dist.get_rank(self.cp_group)
        global_lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        local_lengths = [n // cp for n in global_lengths]
        # [cp * t_local, h, d], rank-major; then reordered into the global row
        key, value = (gather_from_sequence_parallel_region(x, True, group=self.cp_group) for x in (key, value))
        order = context_parallel_gather_order(global_lengths, cp).to(key.device)
        key, value = key.index_select(0, order), value.index_select(0, order)
        outs = []
        queries = torch.split(query, local_lengths)
        keys, values = torch.split(key, global_lengths), torch.split(value, global_lengths)
        for q, k, v, length in zip(queries, keys, values, global_lengths):
            positions = local_positions(length, cp, rank, device=q.device)  # [2c] global positions in the sequence
            allowed = torch.arange(length, device=q.device)[None, :] <= positions[:, None]  # [2c, length]
            q, k, v = (x.permute(1, 0, 2).unsqueeze(0) for x in (q, k, v))
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.softmax_scale, enable_gqa=self.gqa
            )
            outs.append(out[0].permute(1, 0, 2))
        return torch.cat(outs, dim=0)


def _torch_norm(config, hidden_size: int, eps: float) -> torch.nn.Module:
    if config.normalization == "RMSNorm":
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    if config.normalization == "LayerNorm":
        return torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
    raise ValueError(f"normalization {config.normalization!r} is not supported by the local spec")


class SPNorm:
    """Factory with Megatron's norm signature; parameters carry `.sequence_parallel`."""

    # A class whose __new__ returns the norm: Megatron's build_module calls classes but returns plain functions
    # uncalled, so a factory function would not do.
    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:  # type: ignore[misc]
        norm = _torch_norm(config, hidden_size, eps)
        for param in norm.parameters():  # `.sequence_parallel` is read by Megatron's SP gradient reduction
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        return norm


class QKNorm:
    """Per-head RMSNorm of queries/keys (Qwen3); replicated over TP, grads summed by name."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_: Any) -> torch.nn.Module:  # type: ignore[misc]
        return _torch_norm(config, hidden_size, eps)
