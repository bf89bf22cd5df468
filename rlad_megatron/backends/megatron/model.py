"""Build the Megatron-Core student (`GPTModel` chunks + `TransformerConfig`) from a Hugging Face config.

Supported families (decoder-only, RMSNorm, SwiGLU, RoPE, GQA): Llama, Qwen2 (QKV bias),
Qwen3 (QK-norm, explicit head_dim), Qwen3-MoE (Qwen3 attention, every MLP a routed MoE block). `transformer_config_from_hf` maps the HF fields onto
Megatron's; `build_model` returns the model chunks of this pipeline stage (one chunk: virtual
pipeline stages are not used), with `pre_process` / `post_process` set per stage.

Vocabulary padding: the embedding and output layer have `padded_vocab_size(vocab, divisible_by,
tp)` rows, a multiple of `lcm(model.make_vocab_size_divisible_by, TP)`. With the default 128 the
padded size does not depend on TP (for power-of-two TP <= 128), so checkpoints reshard across TP
layouts. Padded rows are never targets; `logprobs.py` masks the padded logit columns.

Layer specs: `local` = Megatron's local spec with `layers.SDPACoreAttention` and `layers.SPNorm`
(CPU and GPU); `transformer_engine` = `get_gpt_layer_with_transformer_engine_spec` (GPU; imported
lazily), with `fp8` from `model.fp8`. `model.megatron` is merged into TransformerConfig verbatim.

RoPE: `conversion/rope.py` computes the inverse frequencies of every supported `rope_type`
(default, linear, llama3 with any parameters, yarn) exactly as transformers does; `build_model`
writes them into the rotary embedding's `inv_freq` (Megatron's own llama3 scaling hard-codes three
of the four llama3 parameters), and YaRN's attention factor, which transformers multiplies cos and
sin by, is handed to Megatron's own unfused RoPE through the `yarn_*` config attributes its
attention reads (`_yarn_concentration_fields`). The Transformer Engine spec uses the same rotary
embedding and the same attention-side RoPE call, so the same `inv_freq` and factor apply there
(not run on a GPU here). Every config field that changes the maths is checked by
`conversion.arch.check_supported` (docs/conversion.md).

MoE (`moe_settings`): SequentialMLP experts (one SwiGLU MLP per expert, the same parameter names
with and without Transformer Engine), the `allgather` token dispatcher (runs on CPU/gloo), no
token dropping (capacity factor off). HF Qwen3-MoE routing is softmax over all experts in fp32,
top-k, then renormalised to sum 1 when `norm_topk_prob`: Megatron's softmax router gives exactly
that with `moe_router_pre_softmax=False` (top-k of the logits, then softmax over the k, which is
the renormalised softmax) and, without renormalisation, with `moe_router_pre_softmax=True`. The
load-balancing loss is on (`aux_loss`, coefficient `router_aux_loss_coef`) only when the HF config
sets `output_router_logits`, as HF training does; Megatron computes it per layer and adds it to the
gradients only, where HF sums one loss over all layers' tokens, so the two losses differ in value.

Left out (refused by name): sliding-window attention, dynamic / longrope RoPE, partial rotary, MTP,
biases on the MLP and o_proj, shared experts; grouped-GEMM experts (`TEGroupedMLP` names its weights
`linear_fc1.weight<e>`: no table rows yet).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rlad_megatron.backends.megatron import compat
from rlad_megatron.conversion import rope
from rlad_megatron.conversion.arch import check_supported

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("qwen3_moe",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_config(hf_config_or_dir: Any):
    """A transformers PretrainedConfig, or a folder / config.json path holding one."""
    if not isinstance(hf_config_or_dir, (str, Path)):
        return hf_config_or_dir
    from transformers import AutoConfig

    path = Path(hf_config_or_dir)
    if path.is_file():
        path = path.parent
    if not (path / "config.json").exists():
        raise ValueError(f"no config.json in {path}; model.student must be a Hugging Face model folder")
    return AutoConfig.from_pretrained(str(path))


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Smallest multiple of lcm(divisible_by, TP) that is >= vocab_size."""
    multiple = math.lcm(max(divisible_by, 1), tensor_model_parallel_size)
    return int(math.ceil(vocab_size / multiple) * multiple)


def _config_dict(hf_config) -> dict[str, Any]:
    return hf_config.to_dict()


def rope_settings(hf_config) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32, attention factor) of the HF config, as transformers computes them."""
    return rope.config_rope(_config_dict(hf_config))


def num_moe_experts(hf_config) -> int:
    """Routed experts per layer of an MoE HF config; 0 for dense models."""
    if getattr(hf_config, "model_type", "") not in MOE_MODEL_TYPES:
        return 0
    return int(getattr(hf_config, "num_experts", 0) or getattr(hf_config, "num_local_experts", 0) or 0)


def moe_settings(hf_config, ep: int) -> dict[str, Any]:
    """TransformerConfig MoE fields reproducing HF Qwen3-MoE routing (see the module docstring)."""
    experts = num_moe_experts(hf_config)
    if experts % ep:
        raise ValueError(f"parallel.expert_model_parallel_size={ep} must divide the number of experts ({experts})")
    if getattr(hf_config, "decoder_sparse_step", 1) != 1 or getattr(hf_config, "mlp_only_layers", None):
        raise ValueError("MoE models with dense layers (decoder_sparse_step != 1 or mlp_only_layers) are not supported")
    topk = hf_config.num_experts_per_tok
    renormalise = bool(getattr(hf_config, "norm_topk_prob", False))
    if topk == 1 and renormalise:
        raise ValueError(
            "num_experts_per_tok=1 with norm_topk_prob=True (routing weight exactly 1) has no Megatron "
            "router equivalent; set norm_topk_prob=False"
        )
    aux_coef = (
        float(getattr(hf_config, "router_aux_loss_coef", 0.0))
        if getattr(hf_config, "output_router_logits", False)
        else 0.0
    )
    return {
        "num_moe_experts": experts,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": hf_config.moe_intermediate_size,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not renormalise,
        "moe_router_load_balancing_type": "aux_loss" if aux_coef > 0 else "none",
        "moe_aux_loss_coeff": aux_coef,
        "moe_token_dispatcher_type": "allgather",
        "moe_grouped_gemm": False,
        "expert_model_parallel_size": ep,
    }


def _check_layout(hf_config, tp: int, pp: int) -> None:
    heads, kv_heads = hf_config.num_attention_heads, _kv_heads(hf_config)
    layers = hf_config.num_hidden_layers
    if heads % tp or kv_heads % tp:
        raise ValueError(
            f"parallel.tensor_model_parallel_size={tp} must divide the attention heads ({heads}) and "
            f"KV heads ({kv_heads}) of the model; choose a TP size dividing both"
        )
    if layers % pp:
        raise ValueError(f"parallel.pipeline_model_parallel_size={pp} must divide the number of layers ({layers})")


def _kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def _check_family(hf_config) -> str:
    model_type = getattr(hf_config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}")
    check_supported(_config_dict(hf_config), model_type)
    return model_type


def _qkv_bias(hf_config, model_type: str) -> bool:
    if model_type == "qwen2":
        return True  # Qwen2 always has q/k/v biases (and no o_proj bias)
    return bool(getattr(hf_config, "attention_bias", False))


def transformer_config_from_hf(hf_config, model_cfg, parallel_cfg):
    """Megatron `TransformerConfig` for this HF config, dtype and parallel layout.

    `model_cfg.megatron` entries override / extend the derived fields verbatim.
    """
    from megatron.core.transformer import TransformerConfig

    model_type = _check_family(hf_config)
    tp, pp = parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size
    _check_layout(hf_config, tp, pp)
    if num_moe_experts(hf_config) and tp > 1 and not parallel_cfg.sequence_parallel:
        raise ValueError(
            f"an MoE student at parallel.tensor_model_parallel_size={tp} needs parallel.sequence_parallel=true "
            "(Megatron-Core's MoE layer refuses tensor parallelism without sequence parallelism in training)"
        )
    dtype = _DTYPES[model_cfg.params_dtype]
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    _, attention_factor = rope_settings(hf_config)
    on_cpu = not torch.cuda.is_available()
    fields: dict[str, Any] = dict(  # noqa: C408  (keyword form mirrors TransformerConfig)
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=_kv_heads(hf_config),
        kv_channels=head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=_qkv_bias(hf_config, model_type),
        qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=parallel_cfg.context_parallel_size,
        sequence_parallel=parallel_cfg.sequence_parallel,
        # The loss adapter normalises by global token / sequence counts itself (trainer.py).
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
    )
    if model_type in MOE_MODEL_TYPES:
        fields.update(moe_settings(hf_config, parallel_cfg.expert_model_parallel_size))
        fields["moe_enable_routing_replay"] = bool(model_cfg.routing_replay)
    elif model_cfg.routing_replay:
        raise ValueError(f"model.routing_replay=true needs an MoE student; {model_type} is dense: set it to false")
    elif parallel_cfg.expert_model_parallel_size != 1:
        raise ValueError(
            f"parallel.expert_model_parallel_size={parallel_cfg.expert_model_parallel_size} needs an MoE "
            f"student; {model_type} is dense: set it to 1"
        )
    if _use_te(model_cfg) and model_cfg.fp8:
        fields.update(fp8=model_cfg.fp8, fp8_recipe="delayed")
    fields.update(model_cfg.megatron or {})
    if model_cfg.routing_replay and fields.get("recompute_granularity"):
        raise ValueError(
            "model.routing_replay=true with activation recomputation (model.megatron.recompute_granularity) is not "
            "supported: the recomputed forward would route on its own; drop recompute_granularity"
        )
    config = TransformerConfig(**fields)
    if attention_factor != 1.0:
        for name, value in _yarn_concentration_fields(attention_factor).items():
            setattr(config, name, value)
    return config


def _yarn_concentration_fields(attention_factor: float) -> dict[str, float]:
    """Config attributes that make Megatron's attention multiply cos and sin by exactly `attention_factor`.

    Megatron reads YaRN's factor from `config.yarn_rotary_scaling_factor`, `yarn_mscale` and
    `yarn_mscale_all_dim` when they exist (attention.py, `_yarn_get_concentration_factor_from_config`):
    (0.1 m ln s + 1) / (0.1 m_all ln s + 1). With s = e and m_all = 0 that is 0.1 m + 1; the m giving
    the factor bit for bit is found by stepping through neighbouring floats, so the product matches
    transformers' `cos * attention_factor` exactly rather than to rounding.
    """
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

    weight = (attention_factor - 1.0) / 0.1
    for _ in range(64):
        got = _yarn_get_concentration_factor(math.e, weight, 0.0)
        if got == attention_factor:
            return {"yarn_rotary_scaling_factor": math.e, "yarn_mscale": weight, "yarn_mscale_all_dim": 0.0}
        weight = math.nextafter(weight, math.inf if got < attention_factor else -math.inf)
    raise ValueError(f"YaRN attention factor {attention_factor!r} has no exact Megatron mscale encoding")


def _use_te(model_cfg) -> bool:
    if model_cfg.transformer_impl == "local":
        return False
    if model_cfg.transformer_impl == "transformer_engine":
        if not torch.cuda.is_available():
            raise ValueError("model.transformer_impl='transformer_engine' needs CUDA; use 'local' or 'auto' on CPU")
        return True
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(config, use_te: bool, vp_stage=None):
    """Block spec: TE layers on GPU, or the local spec with SDPA attention and SP-capable norms."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    experts = config.num_moe_experts
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm
        )
    from rlad_megatron.backends.megatron.layers import QKNorm, SDPACoreAttention, SPNorm

    spec = gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=experts, moe_grouped_gemm=False, qk_layernorm=config.qk_layernorm, normalization="RMSNorm"
    )
    sub = spec.submodules
    sub.input_layernorm = SPNorm
    sub.pre_mlp_layernorm = SPNorm
    sub.self_attention.submodules.core_attention = SDPACoreAttention
    if config.qk_layernorm:
        sub.self_attention.submodules.q_layernorm = QKNorm
        sub.self_attention.submodules.k_layernorm = QKNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=SPNorm)


def build_model(hf_config_or_dir: Any, model_cfg, parallel_cfg) -> list[Any]:
    """Megatron model chunks (a list of one `GPTModel`) for this rank's pipeline stage.

    Needs `init_parallel` first. Each chunk has `.config` (TransformerConfig) and
    `.padded_vocab_size`; `.hf_config` is kept for conversion.
    """
    from megatron.core.models.gpt import GPTModel

    hf_config = load_hf_config(hf_config_or_dir)
    config = transformer_config_from_hf(hf_config, model_cfg, parallel_cfg)
    use_te = _use_te(model_cfg)
    vocab = padded_vocab_size(
        hf_config.vocab_size, model_cfg.make_vocab_size_divisible_by, parallel_cfg.tensor_model_parallel_size
    )
    with compat.cuda_to_cpu():  # tied embeddings under PP call weight.data.cuda() (language_module.py:244)
        model = _gpt_model(GPTModel, config, use_te, vocab, hf_config)
    inv_freq, _ = rope_settings(hf_config)  # the attention factor is in the config's yarn_* attributes
    model.rotary_pos_emb.inv_freq = inv_freq.to(model.rotary_pos_emb.inv_freq.device)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    model.padded_vocab_size = vocab
    model.vocab_size_unpadded = hf_config.vocab_size
    model.hf_config = hf_config
    return [model]


def _gpt_model(GPTModel, config, use_te: bool, vocab: int, hf_config):
    from megatron.core import parallel_state as mpu

    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te),
        vocab_size=vocab,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=mpu.is_pipeline_first_stage(),
        post_process=mpu.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        rotary_base=rope.rope_parameters(_config_dict(hf_config))["rope_theta"],  # replaced by build_model
    )
