"""Name tables: Hugging Face parameter names <-> Megatron-Core GPTModel names, one rule per tensor.

A `Rule` says which HF tensors make one Megatron tensor, through which named transform
(`copy`, `qkv`, `gate_up`, `vocab`), how it is split over tensor parallelism (`transforms.TP_KINDS`)
and under which key it is stored in a Megatron dist checkpoint. Llama, Qwen2 and Qwen3 share one
table; the family decides which optional rows exist (Qwen2: QKV bias; Qwen3: QK-norm; tied
embeddings: no `output_layer`). Megatron names are those of the *local* spec (separate norm
modules); the Transformer Engine spec fuses the norms into the next linear
(`self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`), which are
accepted as aliases and are also the dist-checkpoint keys of both specs (Megatron maps the local
names onto them in `sharded_state_dict`).

Layer rows use `{i}` for the layer index (global, not per pipeline stage).

Qwen3-MoE replaces the dense MLP rows by a router row (`mlp.gate.weight` -> `mlp.router.weight`,
replicated) and one pair of rows per expert e: `mlp.experts.{e}.{gate,up}_proj.weight` ->
`mlp.experts.local_experts.{e}.linear_fc1.weight` (the same gate/up fusion and TP split as the
dense fc1) and `mlp.experts.{e}.down_proj.weight` -> `...local_experts.{e}.linear_fc2.weight`.
Megatron's SequentialMLP numbers experts per expert-parallel rank (0..E/EP-1); the tables use the
global expert index, and `weight_export.global_named_params` renames local experts to it. The
rows carry `expert=e` so a rank can pick the experts it holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rlad_megatron.conversion import transforms as T
from rlad_megatron.conversion.arch import ModelArch

LAYER_PREFIX = "decoder.layers."
_LAYER_NAME = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# HF tensors that carry no weights: skipped without complaint.
IGNORED_HF = (re.compile(r".*\.rotary_emb\.inv_freq$"),)


@dataclass(frozen=True)
class Rule:
    """One Megatron tensor and where it comes from in HF."""

    megatron: str  # full name; layer rows hold "{i}"
    hf: tuple[str, ...]  # HF names in transform order; layer rows hold "{i}"
    transform: str  # copy | qkv | gate_up | vocab
    tp: str  # TP kind, see transforms.TP_KINDS
    ckpt_alias: str = ""  # TE-fused name: the dist-checkpoint key and a live-model alias
    expert: int | None = None  # global expert index of an MoE expert row
    ckpt_also: str = ""  # a second dist-checkpoint spelling of the same tensor (another layer spec's key)

    @property
    def is_layer(self) -> bool:
        return "{i}" in self.megatron

    def megatron_name(self, layer: int | None = None) -> str:
        return self.megatron.format(i=layer)

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]

    @property
    def ckpt_key(self) -> str:
        """Dist-checkpoint key: layer rows are stacked along a leading layer axis, so no index; expert rows
        along a second, expert axis (`SequentialMLP` stores `local_experts.{e}.` under `experts.`)."""
        name = self.ckpt_alias or self.megatron
        if self.expert is not None:
            name = name.replace(f"local_experts.{self.expert}.", "experts.")
        return name.replace("{i}.", "")

    @property
    def ckpt_keys(self) -> tuple[str, ...]:
        """Every key the tensor is written under (the first is preferred when reading)."""
        return (self.ckpt_key, self.ckpt_also.replace("{i}.", "")) if self.ckpt_also else (self.ckpt_key,)

    def ckpt_stack(self, arch: ModelArch, layer: int | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(offsets, sizes) of this tensor on the leading stacked axes of its checkpoint key: none for
        embedding and head, (layer,) of (L,) for a layer row, (layer, expert) of (L, E) for an expert row."""
        if layer is None:
            return (), ()
        if self.expert is None:
            return (layer,), (arch.num_layers,)
        return (layer, self.expert), (arch.num_layers, arch.num_experts)


def layer_rules(arch: ModelArch) -> list[Rule]:
    """Rules of one transformer layer, in a fixed order (the order exports happen in)."""
    L, A, M = "decoder.layers.{i}.", "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    rules = [
        Rule(
            L + "input_layernorm.weight",
            ("model.layers.{i}.input_layernorm.weight",),
            "copy",
            "replicated",
            L + "self_attention.linear_qkv.layer_norm_weight",
        ),
        Rule(
            L + "self_attention.linear_qkv.weight",
            (A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"),
            "qkv",
            "column",
        ),
    ]
    if arch.qkv_bias:
        rules.append(
            Rule(
                L + "self_attention.linear_qkv.bias",
                (A + "q_proj.bias", A + "k_proj.bias", A + "v_proj.bias"),
                "qkv",
                "column",
            )
        )
    if arch.qk_norm:
        rules += [
            Rule(L + "self_attention.q_layernorm.weight", (A + "q_norm.weight",), "copy", "replicated"),
            Rule(L + "self_attention.k_layernorm.weight", (A + "k_norm.weight",), "copy", "replicated"),
        ]
    rules += [
        Rule(L + "self_attention.linear_proj.weight", (A + "o_proj.weight",), "copy", "row"),
    ]
    if arch.is_moe:
        # MoE layers keep a separate pre-MLP norm module in both specs; the local spec's checkpoint stores it
        # under the fused name (its sharded_state_dict_keys_map), the Transformer Engine spec under its own.
        rules.append(
            Rule(
                L + "pre_mlp_layernorm.weight",
                ("model.layers.{i}.post_attention_layernorm.weight",),
                "copy",
                "replicated",
                L + "mlp.linear_fc1.layer_norm_weight",
                ckpt_also=L + "pre_mlp_layernorm.weight",
            )
        )
        return rules + moe_rules(arch)
    rules += [
        Rule(
            L + "pre_mlp_layernorm.weight",
            ("model.layers.{i}.post_attention_layernorm.weight",),
            "copy",
            "replicated",
            L + "mlp.linear_fc1.layer_norm_weight",
        ),
        Rule(L + "mlp.linear_fc1.weight", (M + "gate_proj.weight", M + "up_proj.weight"), "gate_up", "gate_up"),
        Rule(L + "mlp.linear_fc2.weight", (M + "down_proj.weight",), "copy", "row"),
    ]
    return rules


def moe_rules(arch: ModelArch) -> list[Rule]:
    """Router and per-expert rows of one MoE layer (global expert indices)."""
    L, M = "decoder.layers.{i}.mlp.", "model.layers.{i}.mlp."
    rules = [Rule(L + "router.weight", (M + "gate.weight",), "copy", "replicated")]
    for e in range(arch.num_experts):
        E, X = f"{L}experts.local_experts.{e}.", f"{M}experts.{e}."
        rules += [
            Rule(
                E + "linear_fc1.weight", (X + "gate_proj.weight", X + "up_proj.weight"), "gate_up", "gate_up", expert=e
            ),
            Rule(E + "linear_fc2.weight", (X + "down_proj.weight",), "copy", "row", expert=e),
        ]
    return rules


def embedding_rules(arch: ModelArch) -> list[Rule]:
    """Rules before the layers (first pipeline stage)."""
    return [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "column")]


def head_rules(arch: ModelArch) -> list[Rule]:
    """Rules after the layers (last pipeline stage); no output layer when embeddings are tied."""
    rules = [Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", "replicated")]
    if not arch.tie_word_embeddings:
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "vocab", "column"))
    return rules


def iter_tensors(arch: ModelArch):
    """Every (rule, layer) of the model in checkpoint order; layer is None for non-layer rules."""
    return stage_rules(arch, range(arch.num_layers))


def expected_hf_names(arch: ModelArch) -> list[str]:
    return [name for rule, layer in iter_tensors(arch) for name in rule.hf_names(layer)]


def check_hf_names(arch: ModelArch, names) -> None:
    """Raise naming missing or unexpected HF tensors (a tied `lm_head.weight` copy is allowed)."""
    names = set(names)
    expected = set(expected_hf_names(arch))
    missing = sorted(expected - names)
    if missing:
        raise KeyError(
            f"HF checkpoint is missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"required by the {arch.family} table"
        )
    allowed = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    extra = sorted(n for n in names - expected - allowed if not any(p.match(n) for p in IGNORED_HF))
    if extra:
        raise KeyError(
            f"HF checkpoint has tensor(s) {extra[:8]} that the {arch.family} table does not know; "
            "check the architecture / config.json (e.g. attention_bias, num_hidden_layers)"
        )


def rule_for_megatron_name(arch: ModelArch, name: str) -> tuple[Rule, int | None]:
    """Rule (and global layer index) for a live-model parameter name, local or TE spelling.

    `name` must already carry the global layer index (see weight_export for the PP offset).
    """
    match = _LAYER_NAME.match(name)
    if match is None:
        for rule in embedding_rules(arch) + head_rules(arch):
            if rule.megatron == name:
                return rule, None
        raise KeyError(f"Megatron parameter {name!r} has no rule in the {arch.family} table")
    layer, suffix = int(match.group(1)), match.group(2)
    for rule in layer_rules(arch):
        spellings = {rule.megatron.split("{i}.")[1]} | (
            {rule.ckpt_alias.split("{i}.")[1]} if rule.ckpt_alias else set()
        )
        if suffix in spellings:
            return rule, layer
    raise KeyError(f"Megatron parameter {name!r} has no rule in the {arch.family} table")


def _check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} from config.json")


def expected_hf_shapes(rule: Rule, arch: ModelArch) -> list[tuple[int, ...]]:
    """HF shapes of a rule's tensors, from the config (used to name a mismatching tensor early)."""
    H, F, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    if rule.expert is not None:
        F = arch.moe_ffn_hidden_size
    if rule.megatron.endswith("mlp.router.weight"):
        return [(arch.num_experts, H)]
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    leaf = rule.megatron.rsplit(".", 2)[-2:]
    if rule.transform == "qkv":
        return [(q, H), (kv, H), (kv, H)] if leaf[-1] == "weight" else [(q,), (kv,), (kv,)]
    if rule.transform == "gate_up":
        return [(F, H), (F, H)]
    if rule.transform == "vocab":
        return [(arch.vocab_size, H)]
    return [{"linear_proj": (H, q), "linear_fc2": (H, F), "q_layernorm": (d,), "k_layernorm": (d,)}.get(leaf[0], (H,))]


def hf_to_megatron(rule: Rule, tensors: list[torch.Tensor], arch: ModelArch, names: list[str] | None = None):
    """HF tensors (in `rule.hf` order) -> the full (TP=1, unpadded vocab) Megatron tensor."""
    for name, tensor, shape in zip(names or rule.hf, tensors, expected_hf_shapes(rule, arch)):
        _check_shape(name, tensor, shape)
    if rule.transform == "qkv":
        q, k, v = tensors
        return T.fuse_qkv(q, k, v, arch.num_query_groups)
    if rule.transform == "gate_up":
        return T.fuse_gate_up(*tensors)
    return tensors[0]


def megatron_to_hf(rule: Rule, full: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """Full (TP=1) Megatron tensor -> HF tensors in `rule.hf` order (vocab padding dropped)."""
    if rule.transform == "qkv":
        return list(T.split_qkv(full, arch.num_query_groups, arch.heads_per_group, arch.head_dim))
    if rule.transform == "gate_up":
        return list(T.split_gate_up(full))
    if rule.transform == "vocab":
        return [T.unpad_vocab(full, arch.vocab_size)]
    return [full]


def megatron_shape(rule: Rule, arch: ModelArch) -> tuple[int, ...]:
    """Full (TP=1) Megatron shape of a rule's tensor, vocabulary unpadded."""
    shapes = expected_hf_shapes(rule, arch)
    if rule.transform == "qkv":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if rule.transform == "gate_up":
        return (2 * shapes[0][0], shapes[0][1])
    return shapes[0]


def stage_rules(arch: ModelArch, layers, first_stage: bool = True, last_stage: bool = True):
    """(rule, layer) of one pipeline stage in table order: embedding, its layers, then the head."""
    out = [(r, None) for r in embedding_rules(arch)] if first_stage else []
    out += [(r, layer) for layer in layers for r in layer_rules(arch)]
    if last_stage:
        out += [(r, None) for r in head_rules(arch)]
    return out


def hf_entries(arch: ModelArch, dtype: torch.dtype, rules) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(HF name, shape, dtype) of every HF tensor the given (rule, layer) pairs produce, in order."""
    return [
        (name, shape, dtype)
        for rule, layer in rules
        for name, shape in zip(rule.hf_names(layer), expected_hf_shapes(rule, arch))
    ]
