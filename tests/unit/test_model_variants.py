"""Config-variant matrix: every row of docs/conversion.md's field table, against transformers.

Supported rows (tiny random models): the Megatron student's logits (local spec, 1 process) match
transformers within 1e-5 at 300 positions, loaded from the HF folder and from the dist checkpoint
`rlad convert` writes; converting back gives the same tensors and config; the embedded engine's
prefill log-probs match at 300 positions and its greedy decode past position 256 gives transformers'
tokens and log-probs. Refused rows: the trainer's model build, the embedded engine, `rlad convert`
and `rlad train --dry-run` each refuse the config, naming the field.

The RoPE rows use short `original_max_position_embeddings` so that scaling changes the frequencies
of a 16-dim head, and weights 10x the default init so that attention is far from uniform (a wrong
frequency then moves the logits by far more than the tolerance).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from rlad_megatron.config import ModelConfig, ParallelConfig
from rlad_megatron.tiny_models import save_tiny_model

LOGITS_ATOL = 1e-5
POSITIONS = 300
SHARP = {"initializer_range": 0.2}


def _llama3(theta, factor, low, high, context):
    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }


def _yarn(theta, factor, context):
    return {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "original_max_position_embeddings": context}


SUPPORTED = {  # id -> (family, overrides of tiny_hf_config)
    "llama-default": ("llama", {}),
    "llama-llama3-3.1-parameters": ("llama", {"rope_parameters": _llama3(5e5, 8.0, 1.0, 4.0, 8192)}),
    "llama-llama3-long-context-parameters": ("llama", {"rope_parameters": _llama3(1e4, 4.0, 2.0, 8.0, 256)}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
    "llama-yarn-mscale-untruncated": (
        "llama",
        {"rope_parameters": dict(_yarn(1e4, 4.0, 64), mscale=1.0, mscale_all_dim=0.5, truncate=False, beta_fast=16)},
    ),
    "llama-yarn-attention-factor": ("llama", {"rope_parameters": dict(_yarn(1e4, 8.0, 64), attention_factor=1.5)}),
    "llama-head-dim-32-tied": ("llama", {"head_dim": 32, "tie_word_embeddings": True}),
    "llama-rms-norm-eps-0.1": ("llama", {"rms_norm_eps": 0.1}),
    "qwen2-default": ("qwen2", {}),
    "qwen2-yarn": ("qwen2", {"rope_parameters": _yarn(1e6, 4.0, 128)}),
    "qwen3-default": ("qwen3", {}),
    "qwen3-yarn": ("qwen3", {"rope_parameters": _yarn(1e6, 4.0, 128)}),
    "qwen3-head-dim-32-untied": ("qwen3", {"head_dim": 32, "tie_word_embeddings": False}),
}

REFUSED = {  # id -> (family, config.json fields set, the field the refusal names)
    "llama-dynamic": (
        "llama",
        {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
        "rope_type='dynamic'",
    ),
    "llama-longrope": (
        "llama",
        {"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}},
        "rope_type='longrope'",
    ),
    "llama-llama3-missing-parameter": (
        "llama",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "high_freq_factor": 4.0}},
        "low_freq_factor",
    ),
    "llama-partial-rotary": ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "llama-attention-bias": ("llama", {"attention_bias": True}, "attention_bias=True"),
    "llama-mlp-bias": ("llama", {"mlp_bias": True}, "mlp_bias=True"),
    "llama-gelu": ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    "qwen2-sliding-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 64}, "use_sliding_window=True"),
    "qwen3-sliding-layers": (
        "qwen3",
        {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 64},
        "layer_types=['sliding_attention']",
    ),
    "qwen3-attention-bias": ("qwen3", {"attention_bias": True}, "attention_bias=True"),
}


LAYOUTS = {  # config.json RoPE layouts transformers reads: 5.x, 4.x (rope_scaling + top-level theta, "type")
    "transformers5": {"rope_parameters": _yarn(5e5, 4.0, 64)},
    "transformers4": {
        "rope_theta": 5e5,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
    "context-from-max-positions": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        "max_position_embeddings": 64,
    },
    "top-level-theta-only": {"rope_theta": 1234.0},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_rope_parameters_are_read_from_every_config_layout_as_transformers_does(layout):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from rlad_megatron.conversion.rope import config_rope

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 512}
    config.update(LAYOUTS[layout])
    hf = LlamaConfig.from_dict(copy.deepcopy(config))  # transformers fills in the nested dict it is given
    rope_type = hf.rope_parameters["rope_type"]
    init = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
    want_inv_freq, want_factor = init(hf)
    inv_freq, factor = config_rope(config)
    assert torch.equal(inv_freq, want_inv_freq) and factor == want_factor


@pytest.fixture(scope="module")
def parallel():
    from rlad_megatron.backends.megatron.parallel import destroy_parallel, init_parallel

    ctx = init_parallel(ParallelConfig(), seed=1234)
    yield ctx
    destroy_parallel(ctx)


def _ids(vocab: int, rows: int = 2, length: int = POSITIONS) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0))


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _megatron_logits(chunks, ids: torch.Tensor) -> torch.Tensor:
    model = chunks[0]
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, None)[..., : model.vocab_size_unpadded]


def _state(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("row", sorted(SUPPORTED))
def test_supported_variant_matches_transformers_everywhere(tmp_path, parallel, row):
    from rlad_megatron.backends.megatron.checkpoint_convert import load_hf_weights, load_model_checkpoint
    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.conversion import convert
    from rlad_megatron.engines.base import SamplingParams
    from rlad_megatron.engines.embedded import EmbeddedEngine

    family, overrides = SUPPORTED[row]
    hf_dir = save_tiny_model(tmp_path / "hf", family, seed=5, tokenizer=False, **SHARP, **overrides)
    hf = _hf(hf_dir)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        reference = hf(ids).logits
    assert reference.std() > 0.3  # a real signal, not near-uniform logits

    model_cfg = ModelConfig(transformer_impl="local")
    chunks = build_model(hf_dir, model_cfg, ParallelConfig())
    load_hf_weights(chunks, hf_dir, tp_group=parallel.tp_group)
    torch.testing.assert_close(_megatron_logits(chunks, ids), reference, atol=LOGITS_ATOL, rtol=0)

    convert.hf_to_megatron(hf_dir, tmp_path / "mcore")
    chunks = build_model(hf_dir, model_cfg, ParallelConfig())
    load_model_checkpoint(chunks, tmp_path / "mcore")
    torch.testing.assert_close(_megatron_logits(chunks, ids), reference, atol=LOGITS_ATOL, rtol=0)
    convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "back", hf_config_dir=hf_dir)
    original, back = _state(hf_dir), _state(tmp_path / "back")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    config_back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config_back.get("rope_parameters") == json.loads((hf_dir / "config.json").read_text()).get("rope_parameters")

    engine = EmbeddedEngine(str(hf_dir), max_batch_size=2)
    engine_model = engine.model
    with torch.no_grad():
        prefill = engine_model.logits(engine_model.forward(ids, torch.arange(ids.shape[1]).expand_as(ids)))
    torch.testing.assert_close(prefill.log_softmax(-1), reference.log_softmax(-1), atol=LOGITS_ATOL, rtol=0)
    prompt = ids[0, :260].tolist()  # decode steps run at positions 260..267, past every original context here
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True))[0][0]
    with torch.no_grad():
        greedy = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(prompt) :].tolist()
        full = hf(torch.tensor([prompt + greedy])).logits[0].log_softmax(-1)
    assert out.response_ids == greedy
    want = full[len(prompt) - 1 : -1].gather(-1, torch.tensor(greedy)[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(out.logprobs), want, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    """One tiny model folder per family (with tokenizer), copied and edited by each refused row."""
    root = tmp_path_factory.mktemp("base")
    return {family: save_tiny_model(root / family, family, seed=1) for family in ("llama", "qwen2", "qwen3")}


def _refused_folder(base: Path, dest: Path, fields: dict) -> Path:
    shutil.copytree(base, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(fields)
    if "rope_scaling" in fields:
        config.pop("rope_parameters", None)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize("row", sorted(REFUSED))
def test_unsupported_variant_is_refused_by_name_everywhere(tmp_path, base_folders, row):
    from rlad_megatron.backends.megatron.model import transformer_config_from_hf
    from rlad_megatron.config import load_config
    from rlad_megatron.conversion import convert
    from rlad_megatron.engines.model import ModelSpec, read_config
    from rlad_megatron.preflight import preflight

    family, fields, named = REFUSED[row]
    folder = _refused_folder(base_folders[family], tmp_path / "model", fields)
    config = read_config(folder)

    with pytest.raises((ValueError, KeyError)) as trainer_err:  # KeyError: transformers' own config check
        transformer_config_from_hf(_hf_config_object(config), ModelConfig(), ParallelConfig())
    with pytest.raises(ValueError) as engine_err:
        ModelSpec(config)
    with pytest.raises(ValueError) as convert_err:
        convert.hf_to_megatron(folder, tmp_path / "mcore")
    assert not (tmp_path / "mcore").exists()
    cfg = load_config(
        None,
        [f"model.student={folder}", f"model.teacher={folder}", "algorithm.name=opd", "teacher.kind=embedded"],
    )
    problems, _ = preflight(cfg)
    for message in (str(trainer_err.value), str(engine_err.value), str(convert_err.value), "\n".join(problems)):
        assert named in message, message


def _hf_config_object(config: dict):
    """The transformers config the trainer would load (skipping transformers' own validation warnings)."""
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)
