"""A plain-torch decoder for HF Llama / Qwen2 / Qwen3 / Qwen3-MoE checkpoints, built for batched KV-cache decoding.

The architecture is read from config.json: RMSNorm, rotary embeddings (default, linear, llama3
and yarn RoPE, frequencies and YaRN's cos/sin factor from `conversion/rope.py`, the same code the
trainer uses), grouped-query attention, the Qwen2 QKV bias, the Qwen3 per-head QK RMSNorm and tied
embeddings. Configs outside that are refused by `conversion.arch.check_supported`, naming the
field. Weights come from safetensors only (never pickle).

For speed the Q/K/V projections and the gate/up projections are stored fused, and every HF
parameter name maps to a *view* into the fused tensor (`named_parameters_hf`), so an in-place
update by HF name (`load_tensors`) writes straight into the fused weight.

Qwen3-MoE: every MLP is a routed block as in transformers: router logits, softmax over all
experts in fp32, top-k, renormalised when `norm_topk_prob`, weights cast back to the model dtype;
each expert's SwiGLU runs on the tokens routed to it. Experts are stored stacked (`[E, 2F, H]`,
`[E, H, F]`), one view per HF expert tensor. `Routes` records the experts of every token (MoE routing replay:
the trainer replays them) or forces given ones (weights: the router's probabilities of them).

Left out (refused by name): dynamic / longrope RoPE, partial rotary, sliding-window attention,
o_proj / MLP biases, shared experts / dense layers inside MoE models; quantised checkpoints.

Shapes: B batch, T new tokens, S cache length, H query heads, K kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlad_megatron.conversion import rope
from rlad_megatron.conversion.arch import UnsupportedModelError, check_supported

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe")
# Decode RoPE matrices are precomputed per position when the [positions, D, D] table stays this small
# (tiny models); larger head dims / contexts build the [B, D, D] matrices each step instead.
ROT_TABLE_MAX_BYTES = 32 << 20


class ModelSpec:
    """The architecture numbers a forward pass needs, parsed and validated from config.json."""

    def __init__(self, cfg: dict):
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"model_type={mt!r} is not supported by the embedded engine; supported: {list(SUPPORTED)}")
        self.model_type = mt
        try:
            check_supported(cfg, mt)
        except UnsupportedModelError as err:
            raise ValueError(f"the embedded engine cannot run this model: {err}") from None
        self.vocab_size = int(cfg["vocab_size"])
        self.hidden_size = int(cfg["hidden_size"])
        self.intermediate_size = int(cfg["intermediate_size"])
        self.num_layers = int(cfg["num_hidden_layers"])
        self.num_heads = int(cfg["num_attention_heads"])
        self.num_kv_heads = int(cfg.get("num_key_value_heads") or self.num_heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden_size // self.num_heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.tie_embeddings = bool(cfg.get("tie_word_embeddings", False))
        self.max_positions = int(cfg.get("max_position_embeddings", 4096))
        self.qkv_bias = mt == "qwen2" or bool(cfg.get("attention_bias", False))
        self.qk_norm = mt in ("qwen3", "qwen3_moe")
        moe = mt == "qwen3_moe"
        self.num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if moe else 0
        self.moe_intermediate_size = int(cfg["moe_intermediate_size"]) if moe else 0
        self.moe_topk = int(cfg.get("num_experts_per_tok", 0)) if moe else 0
        self.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))
        if moe and (cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1):
            raise ValueError("MoE models with dense layers (mlp_only_layers, decoder_sparse_step) are not supported")
        if cfg.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported by the embedded engine")
        self.rope_inv_freq, self.rope_attention_factor = rope.config_rope(cfg)
        eos = cfg.get("eos_token_id")
        self.eos_token_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: model folders must be Hugging Face format (config.json + safetensors)"
        )
    cfg = json.loads(path.read_text())
    eos_extra = Path(model_dir) / "generation_config.json"
    if eos_extra.is_file() and "eos_token_id" in (gen := json.loads(eos_extra.read_text())):
        cfg["eos_token_id"] = gen["eos_token_id"]
    return cfg


def iter_safetensors(model_dir: str | Path) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) of every shard; refuses folders without safetensors or with missing shards."""
    from safetensors import safe_open

    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder}: shards listed in model.safetensors.index.json are missing: {missing}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder}: no *.safetensors files (pickle checkpoints are refused; re-save with safetensors)"
        )
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield key, f.get_tensor(key)


class Routes:
    """MoE routing of one forward: `chosen` gets each MoE layer's expert ids, [..., k] over the token dims of
    the call (layer order); `forced` ([..., layers, k], optional) makes the layers use those experts instead
    of their own top-k. `stacked()` is [..., layers, k]."""

    def __init__(self, forced: torch.Tensor | None = None):
        self.forced = forced
        self.chosen: list[torch.Tensor] = []

    def stacked(self) -> torch.Tensor:
        return torch.stack(self.chosen, dim=-2)


def compact_expert_ids(ids, num_experts: int):
    """Expert ids as the smallest numpy integer type that holds them (int16 up to 32767 experts, else int32)."""
    import numpy as np

    dtype = np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32
    return np.asarray(ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids, dtype=dtype)


class DecoderModel:
    """Fused-weight decoder; `forward` runs prefill (cache rows from 0) or one decode step."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        self.spec, self.dtype = spec, dtype
        s = spec
        h, d = s.hidden_size, s.head_dim
        self.q_size, self.kv_size = s.num_heads * d, s.num_kv_heads * d
        self.embed = torch.zeros(s.vocab_size, h, dtype=dtype)
        self.lm_head = self.embed if s.tie_embeddings else torch.zeros(s.vocab_size, h, dtype=dtype)
        self.final_norm = torch.ones(h, dtype=dtype)
        self.layers: list[dict[str, Any]] = []  # per layer: fused weight name -> tensor, or None where absent
        for _ in range(s.num_layers):
            qkv_out = self.q_size + 2 * self.kv_size
            self.layers.append(
                {
                    "ln1": torch.ones(h, dtype=dtype),
                    "ln2": torch.ones(h, dtype=dtype),
                    "qkv": torch.zeros(qkv_out, h, dtype=dtype),
                    "qkv_b": torch.zeros(qkv_out, dtype=dtype) if s.qkv_bias else None,
                    "o": torch.zeros(h, self.q_size, dtype=dtype),
                    "q_norm": torch.ones(d, dtype=dtype) if s.qk_norm else None,
                    "k_norm": torch.ones(d, dtype=dtype) if s.qk_norm else None,
                }
            )
            if s.num_experts:
                E, mi = s.num_experts, s.moe_intermediate_size
                self.layers[-1].update(
                    router=torch.zeros(E, h, dtype=dtype),
                    experts_gate_up=torch.zeros(E, 2 * mi, h, dtype=dtype),
                    experts_down=torch.zeros(E, h, mi, dtype=dtype),
                )
            else:
                self.layers[-1].update(
                    gate_up=torch.zeros(2 * s.intermediate_size, h, dtype=dtype),
                    down=torch.zeros(h, s.intermediate_size, dtype=dtype),
                )
        self._views = self._hf_views()
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._rot_table: torch.Tensor | None = None  # [n, D, D] decode RoPE matrices, one per position, or None
        self.refresh_derived()

    def _hf_views(self) -> dict[str, torch.Tensor]:
        v = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.final_norm}
        if not self.spec.tie_embeddings:
            v["lm_head.weight"] = self.lm_head
        q, kv, inter = self.q_size, self.kv_size, self.spec.intermediate_size
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            v[p + "input_layernorm.weight"] = L["ln1"]
            v[p + "post_attention_layernorm.weight"] = L["ln2"]
            for name, sl in (
                ("q_proj", slice(0, q)),
                ("k_proj", slice(q, q + kv)),
                ("v_proj", slice(q + kv, q + 2 * kv)),
            ):
                v[p + f"self_attn.{name}.weight"] = L["qkv"][sl]
                if L["qkv_b"] is not None:
                    v[p + f"self_attn.{name}.bias"] = L["qkv_b"][sl]
            v[p + "self_attn.o_proj.weight"] = L["o"]
            if L["q_norm"] is not None:
                v[p + "self_attn.q_norm.weight"] = L["q_norm"]
                v[p + "self_attn.k_norm.weight"] = L["k_norm"]
            if self.spec.num_experts:
                mi = self.spec.moe_intermediate_size
                v[p + "mlp.gate.weight"] = L["router"]
                for ex in range(self.spec.num_experts):
                    v[p + f"mlp.experts.{ex}.gate_proj.weight"] = L["experts_gate_up"][ex, :mi]
                    v[p + f"mlp.experts.{ex}.up_proj.weight"] = L["experts_gate_up"][ex, mi:]
                    v[p + f"mlp.experts.{ex}.down_proj.weight"] = L["experts_down"][ex]
                continue
            v[p + "mlp.gate_proj.weight"] = L["gate_up"][:inter]
            v[p + "mlp.up_proj.weight"] = L["gate_up"][inter:]
            v[p + "mlp.down_proj.weight"] = L["down"]
        return v

    def named_parameters_hf(self) -> dict[str, torch.Tensor]:
        """HF name -> tensor view (writing into a view writes into the fused weight)."""
        return dict(self._views)

    @torch.inference_mode()
    def load_tensors(self, named: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> int:
        """Copy HF-named tensors in place; unknown names or wrong shapes raise; strict checks completeness."""
        seen = set()
        for name, t in named:
            if name == "lm_head.weight" and self.spec.tie_embeddings:
                continue  # tied: the embedding is the head
            if name.endswith("rotary_emb.inv_freq"):
                continue
            dst = self._views.get(name)
            if dst is None:
                raise KeyError(f"unknown parameter {name!r} for a {self.spec.model_type} model")
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"parameter {name!r} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(t.to(dst.dtype))
            seen.add(name)
        self.refresh_derived()
        missing = sorted(set(self._views) - seen)
        if strict and missing:
            raise ValueError(f"checkpoint is missing {len(missing)} parameters, e.g. {missing[:3]}")
        return len(seen)

    def _ensure_rope(self, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin tables [n >= need, D], plus the decode rotation table, built on first need."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < need:
            n, d = max(need, 256) * 2, self.spec.head_dim
            freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.spec.rope_inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            scale = self.spec.rope_attention_factor  # YaRN's factor on cos and sin (1 otherwise), as transformers
            cos, sin = emb.cos() * scale, emb.sin() * scale
            sin[:, : d // 2] *= -1  # rotate_half(x) * sin == swap_halves(x) * signed_sin
            self._rope_cache = (cos.to(self.dtype), sin.to(self.dtype))
            table_bytes = n * d * d * self._rope_cache[0].element_size()
            self._rot_table = _rotation_table(*self._rope_cache) if table_bytes <= ROT_TABLE_MAX_BYTES else None
        return self._rope_cache

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions [B, T], shaped [B or 1, T, 1, D] (sin's first half negated).

        Prefill positions are always 0..T-1 for every row (right padding), decode positions differ per row.
        """
        cos, sin = self._ensure_rope(int(positions.max()) + 1)
        if positions.shape[1] > 1:  # prefill always starts at 0: a broadcast slice, no gather
            T = positions.shape[1]
            return cos[:T].view(1, T, 1, -1), sin[:T].view(1, T, 1, -1)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def refresh_derived(self) -> None:
        """Recompute tensors derived from the weights (call after any in-place weight change)."""
        for L in self.layers:
            if L["q_norm"] is not None:
                s = self.spec
                L["qk_norm"] = torch.cat([L["q_norm"].expand(s.num_heads, -1), L["k_norm"].expand(s.num_kv_heads, -1)])

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        rows: torch.Tensor | None = None,
        routes: Routes | None = None,
    ) -> torch.Tensor:
        """Prefill: hidden states after the final norm, [B, T, hidden].

        tokens, positions: [B, T] with positions 0..T-1 in every row. Causal attention within the
        T tokens (right padding is harmless: real tokens never attend later positions); K/V are
        written to cache rows `rows` at positions 0..T-1 when a cache is given. `routes` (MoE only)
        records the experts every token was routed to, or forces them (see `Routes`).
        """
        s = self.spec
        B, T = tokens.shape
        H, K, D = s.num_heads, s.num_kv_heads, s.head_dim
        if (cache is None) != (rows is None):
            raise ValueError("prefill writes K/V only with both a cache and its `rows`")
        x = F.embedding(tokens, self.embed)
        cos, sin = self._rope(positions)
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden_size,), L["ln1"], s.eps)
            qkv = F.linear(h, L["qkv"], L["qkv_b"])
            qk = qkv[..., : self.q_size + self.kv_size].view(B, T, H + K, D)
            v = qkv[..., self.q_size + self.kv_size :].view(B, T, K, D).transpose(1, 2)
            qk = self._rotate(L, qk, cos, sin)
            q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)
            if cache is not None and rows is not None:
                cache.write_prefill(li, rows, k, v)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
            x += F.linear(attn.reshape(B, T, self.q_size), L["o"])
            h = F.rms_norm(x, (s.hidden_size,), L["ln2"], s.eps)
            if s.num_experts:
                x += self._moe(L, h, li, routes)
                continue
            inter = s.intermediate_size  # contiguous halves: elementwise ops on large strided views are slower
            gate, up = F.linear(h, L["gate_up"][:inter]), F.linear(h, L["gate_up"][inter:])
            x += F.linear(F.silu(gate).mul_(up), L["down"])
        return F.rms_norm(x, (s.hidden_size,), self.final_norm, s.eps)

    def _moe(self, L: dict, h: torch.Tensor, layer: int, routes: Routes | None = None) -> torch.Tensor:
        """Routed experts on h [..., hidden], HF Qwen3-MoE routing (see the module docstring).

        With `routes.forced` the experts are the given ones and their weights the router's probabilities of
        them (what Megatron's router replay does); `routes.chosen` receives the experts used."""
        s = self.spec
        flat = h.reshape(-1, s.hidden_size)
        probs = torch.softmax(F.linear(flat, L["router"]), dim=-1, dtype=torch.float32)
        if routes is not None and routes.forced is not None:
            chosen = routes.forced[..., layer, :].reshape(-1, s.moe_topk).to(torch.int64)
            weights = probs.gather(-1, chosen)
        else:
            weights, chosen = torch.topk(probs, s.moe_topk, dim=-1)
        if routes is not None:
            routes.chosen.append(chosen.view(*h.shape[:-1], s.moe_topk))
        if s.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        mi = s.moe_intermediate_size
        for ex in chosen.unique().tolist():
            token, slot = torch.where(chosen == ex)
            rows = flat[token]
            gate, up = F.linear(rows, L["experts_gate_up"][ex, :mi]), F.linear(rows, L["experts_gate_up"][ex, mi:])
            y = F.linear(F.silu(gate) * up, L["experts_down"][ex]) * weights[token, slot, None]
            out.index_add_(0, token, y)
        return out.view_as(h)

    def _rotate(self, L: dict, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Qwen3 QK-norm (if any) then RoPE on the joint [..., H + K, D] query/key tensor."""
        D = self.spec.head_dim
        if L["q_norm"] is not None:
            qk = F.rms_norm(qk, (D,), None, self.spec.eps) * L["qk_norm"]
        rotated = torch.cat((qk[..., D // 2 :], qk[..., : D // 2]), dim=-1).mul_(sin)
        return (qk * cos).add_(rotated)  # in place where possible: prefill is memory-bound

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, attn_len: int, routes: Routes | None = None
    ) -> torch.Tensor:
        """One decode step for rows [0, B) of the cache: hidden after the final norm, [B, hidden].

        tokens, positions: [B]. K/V are written at `positions`; attention covers cache[:, :attn_len]
        masked to positions <= own. At decode sizes dispatch overhead, not arithmetic, is the cost,
        so activations stay 2-D, RoPE is one batched matmul with per-row rotation matrices gathered
        from a per-position table, and scaled + masked scores are one baddbmm.
        """
        s = self.spec
        B = tokens.shape[0]
        H, K, D = s.num_heads, s.num_kv_heads, s.head_dim
        x = F.embedding(tokens, self.embed)
        cos, sin = self._ensure_rope(attn_len)  # positions < attn_len by the caller's contract
        rot = (
            self._rot_table[positions]
            if self._rot_table is not None
            else _rotation_table(cos[positions], sin[positions])
        )
        mask = cache.set_decode_positions(positions, attn_len, x.dtype)  # [B * K, 1, S], shared by all layers
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (s.hidden_size,), L["ln1"], s.eps)
            qkv = F.linear(h, L["qkv"], L["qkv_b"])
            qk = qkv[:, : self.q_size + self.kv_size].view(B, H + K, D)
            if L["q_norm"] is not None:
                qk = F.rms_norm(qk, (D,), None, s.eps) * L["qk_norm"]
            qk = torch.bmm(qk, rot)
            k, v = cache.write_decode(li, qk[:, H:], qkv[:, self.q_size + self.kv_size :].view(B, K, D), attn_len)
            attn = _decode_attention(qk[:, :H], k, v, mask)
            x += F.linear(attn, L["o"])
            h = F.rms_norm(x, (s.hidden_size,), L["ln2"], s.eps)
            if s.num_experts:
                x += self._moe(L, h, li, routes)
                continue
            gate, up = F.linear(h, L["gate_up"]).chunk(2, dim=-1)  # one fused matmul for tiny decode steps
            x += F.linear(F.silu(gate).mul_(up), L["down"])
        return F.rms_norm(x, (s.hidden_size,), self.final_norm, s.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()


def _rotation_table(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[n, D, D] matrices R with x @ R == rope(x) at each position (x * cos + swap_halves(x) * signed sin)."""
    D = cos.shape[-1]
    rot = torch.diag_embed(cos)
    j = torch.arange(D)
    rot[:, (j + D // 2) % D, j] = sin  # out_j gets x_{(j + D/2) % D} * signed sin_j
    return rot


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row against the cache; q [B, H, D], k [B, K, D, S], v [B, K, S, D], mask [B * K, 1, S].

    Returns [B, H * D]. Grouped heads are folded into the query dimension ([B * K, H/K, D]) so K/V
    are never repeated; batched matmuls beat SDPA's CPU kernel for single-token queries.
    """
    B, H, D = q.shape
    K, S = k.shape[1], k.shape[3]
    scores = torch.baddbmm(mask, q.reshape(B * K, H // K, D), k.reshape(B * K, D, S), alpha=D**-0.5)
    return torch.bmm(scores.softmax(dim=-1), v.reshape(B * K, S, D)).view(B, H * D)


class KVCache:
    """Static per-batch cache, preallocated once: k [layers][rows, K, D, S] (pre-transposed, so the decode
    score matmul reads it as a plain [D, S] operand) and v [layers][rows, K, S, D]."""

    def __init__(self, spec: ModelSpec, rows: int, max_len: int, dtype: torch.dtype):
        K, D = spec.num_kv_heads, spec.head_dim
        self.k = [torch.zeros(rows, K, D, max_len, dtype=dtype) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(rows, K, max_len, D, dtype=dtype) for _ in range(spec.num_layers)]
        self.max_len, self.num_kv_heads, self.head_dim = max_len, K, D
        heads = torch.arange(rows * K)
        self._v_base = heads * max_len  # [rows * K]: start of each (row, head) block of v
        self._k_base = (heads[:, None] * D + torch.arange(D)[None, :]) * max_len  # [rows * K, D]
        self._columns = torch.arange(max_len)
        self._v_index = torch.empty(0, dtype=torch.long)  # set by each decode step (`decode_positions`)
        self._k_index = torch.empty(0, dtype=torch.long)

    def write_prefill(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, K, T, D] at positions 0..T-1 of cache rows `rows`."""
        T = k.shape[2]
        self.k[layer][rows, :, :, :T] = k.transpose(-1, -2)
        self.v[layer][rows, :, :T] = v

    def set_decode_positions(self, pos: torch.Tensor, attn_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Flat indices of this step's writes for rows [0, n) at positions pos [n], computed once per step.

        Returns the additive attention mask [n * K, 1, attn_len]: 0 where column <= own position, else -inf.
        """
        n, K = pos.shape[0], self.num_kv_heads
        per_head = pos.repeat_interleave(K)
        self._v_index = self._v_base[: n * K] + per_head
        self._k_index = (self._k_base[: n * K] + per_head[:, None]).view(-1)
        hidden = self._columns[:attn_len] > per_head[:, None]
        return torch.zeros((), dtype=dtype).masked_fill(hidden, float("-inf")).unsqueeze(1)

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor, attn_len: int):
        """k, v [n, K, D] written at the step's positions; returns k [n, K, D, attn_len], v [n, K, attn_len, D]."""
        n, D = k.shape[0], self.head_dim
        self.k[layer].view(-1).index_copy_(0, self._k_index, k.reshape(-1))
        self.v[layer].view(-1, D).index_copy_(0, self._v_index, v.reshape(-1, D))
        return self.k[layer][:n, :, :, :attn_len], self.v[layer][:n, :, :attn_len]


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> DecoderModel:
    model = DecoderModel(ModelSpec(read_config(model_dir)), dtype=dtype)
    model.load_tensors(iter_safetensors(model_dir))
    return model
