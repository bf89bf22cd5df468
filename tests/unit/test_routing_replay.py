"""Routing replay plumbing on one process: the engine records its experts, the trainer's forwards use them.

A tiny random Qwen3-MoE (4 experts, top-2) served by the embedded engine and trained by the Megatron
trainer, both fp32. Claims:
- the experts the engine records while generating (prefill + decode, continuous batching) are the ones a
  plain forward over prompt + response routes to, one row per fed token;
- forcing experts: the trainer's `compute_logprobs` on samples carrying *other* experts than the natural
  ones (the complement set) equals the engine's forward forced to the same experts, packed into several
  micro-batches, with chunked and with whole-row log-probs; and differs from the natural log-probs;
- the training step's forward replays too: with old log-probs from the forced forward, the PPO ratio is 1;
- agreement: 1.0 with the engine's own routes, 0.0 with the complement;
- bad input (a dense student, samples without routes, routes of the wrong length) fails naming the fix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlad_megatron.config import RunConfig
from rlad_megatron.engines.base import SamplingParams
from rlad_megatron.engines.embedded import EmbeddedEngine
from rlad_megatron.engines.model import Routes
from rlad_megatron.tiny_models import save_tiny_model
from rlad_megatron.types import Sample

PROMPTS = [[5, 17, 42, 9], [64, 2, 8, 99, 41, 12], [21, 6], [77, 3, 61, 28, 14]]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("replay") / "hf", "qwen3_moe", seed=3, tokenizer=False)


@pytest.fixture(scope="module")
def engine(hf):
    return EmbeddedEngine(hf, max_batch_size=2)  # 8 sequences through 2 rows: admissions mid-batch, row moves


@pytest.fixture(scope="module")
def samples(engine):
    sp = SamplingParams(max_new_tokens=7, seed=4, ignore_eos=True, return_routed_experts=True)
    outs = engine.generate(PROMPTS, sp, n=2)
    return [
        Sample(
            prompt_ids=p,
            response_ids=o.response_ids,
            rollout_logprobs=o.logprobs,
            finish_reason=o.finish_reason,
            routed_experts=o.routed_experts,
        )
        for p, group in zip(PROMPTS, outs)
        for o in group
    ]


def make_trainer(hf, chunk_size: int):
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.checkpoint_convert import load_hf_weights
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer

    cfg = RunConfig()
    cfg.algorithm.name = "grpo"
    cfg.model.transformer_impl = "local"
    cfg.model.routing_replay = True
    cfg.model.logprob_chunk_size = chunk_size
    cfg.train.micro_batch_tokens = 24
    return MegatronTrainer(cfg, build_objective(cfg.algorithm), hf_config=hf, weight_loader=load_hf_weights)


@pytest.fixture(scope="module", params=[1024, 0], ids=["chunked", "whole_row"])
def trainer(request, hf):
    from rlad_megatron.backends.megatron.parallel import destroy_parallel

    built = make_trainer(hf, request.param)
    yield built
    destroy_parallel(built.parallel)


def natural_routes(engine, sample: Sample) -> torch.Tensor:
    ids = sample.prompt_ids + sample.response_ids
    routes = Routes()
    with torch.no_grad():
        engine.model.forward(torch.tensor([ids[:-1]]), torch.arange(len(ids) - 1)[None], routes=routes)
    return routes.stacked()[0]


def forced_logprobs(engine, sample: Sample, forced: np.ndarray) -> list[float]:
    """The engine's log-probs of the response when every MoE layer uses `forced` experts."""
    ids = sample.prompt_ids + sample.response_ids
    with torch.no_grad():
        hidden = engine.model.forward(
            torch.tensor([ids[:-1]]),
            torch.arange(len(ids) - 1)[None],
            routes=Routes(forced=torch.from_numpy(forced.astype(np.int64))[None]),
        )
        lp = engine.model.logits(hidden[0]).log_softmax(-1)
    start = len(sample.prompt_ids) - 1
    return [float(lp[start + j, t]) for j, t in enumerate(sample.response_ids)]


def complement(routes: np.ndarray, num_experts: int = 4) -> np.ndarray:
    """For top-2 of 4 experts: the two experts each token was NOT routed to."""
    out = np.empty_like(routes)
    for index in np.ndindex(routes.shape[:-1]):
        out[index] = [e for e in range(num_experts) if e not in routes[index]]
    return out


def with_routes(samples, routes_of) -> list[Sample]:
    import dataclasses

    return [dataclasses.replace(s, routed_experts=routes_of(s)) for s in samples]


def test_engine_records_one_row_per_fed_token_equal_to_a_plain_forward(engine, samples):
    for s in samples:
        assert s.routed_experts.dtype == np.int16
        assert s.routed_experts.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2)
        assert np.array_equal(np.sort(s.routed_experts, -1), np.sort(natural_routes(engine, s).numpy(), -1))


def test_replayed_logprobs_equal_the_engine_forced_to_the_same_experts(engine, samples, trainer):
    own = trainer.compute_logprobs(samples)
    assert trainer.routing_agreement() == {"routing/agreement": 1.0}
    for s, got in zip(samples, own):
        np.testing.assert_allclose(got, s.rollout_logprobs, atol=1e-5, rtol=0)
    other = with_routes(samples, lambda s: complement(s.routed_experts))
    replayed = trainer.compute_logprobs(other)
    assert trainer.routing_agreement() == {"routing/agreement": 0.0}
    gaps = []
    for s, got, natural in zip(other, replayed, own):
        np.testing.assert_allclose(got, forced_logprobs(engine, s, s.routed_experts), atol=1e-5, rtol=0)
        gaps.append(np.abs(np.subtract(got, natural)).max())
    assert min(gaps) > 1e-3  # the forced experts really changed every sample's log-probs


def test_training_forward_replays_the_samples_experts(engine, samples, trainer):
    other = with_routes(samples, lambda s: complement(s.routed_experts))
    forced = [forced_logprobs(engine, s, s.routed_experts) for s in other]
    advantages = [1.0 if i % 2 else -1.0 for i in range(len(other))]
    replayed = trainer.forward_backward(other, advantages, 0, old_logprobs=forced)
    assert abs(replayed["ratio_mean"] - 1.0) < 1e-5
    natural = trainer.forward_backward(samples, advantages, 0, old_logprobs=forced)  # own routes, forced old
    assert abs(natural["ratio_mean"] - 1.0) > 1e-3


def test_bad_input_names_the_problem(hf, samples, trainer, tmp_path):
    import dataclasses

    from rlad_megatron.backends.megatron.model import transformer_config_from_hf
    from rlad_megatron.config import ModelConfig, ParallelConfig
    from rlad_megatron.tiny_models import tiny_hf_config

    with pytest.raises(ValueError, match="sample 0 has no routed_experts"):
        trainer.compute_logprobs([dataclasses.replace(samples[0], routed_experts=None)])
    short = dataclasses.replace(samples[0], routed_experts=samples[0].routed_experts[:-1])
    with pytest.raises(ValueError, match=r"routed_experts has shape .*expected \[10, layers, k\]"):
        trainer.compute_logprobs([short])
    dense = ModelConfig(transformer_impl="local", routing_replay=True)
    with pytest.raises(ValueError, match="routing_replay=true needs an MoE student"):
        transformer_config_from_hf(tiny_hf_config("qwen3"), dense, ParallelConfig())
    recompute = ModelConfig(transformer_impl="local", routing_replay=True, megatron={"recompute_granularity": "full"})
    with pytest.raises(ValueError, match="activation recomputation"):
        transformer_config_from_hf(tiny_hf_config("qwen3_moe"), recompute, ParallelConfig())
    dense_dir = save_tiny_model(tmp_path / "dense", "qwen3", tokenizer=False)
    with pytest.raises(ValueError, match="return_routed_experts needs an MoE model"):
        EmbeddedEngine(dense_dir).generate([[1, 2]], SamplingParams(max_new_tokens=2, return_routed_experts=True))


def test_routes_survive_the_jsonl_round_trip(samples):
    back = Sample.from_dict(samples[0].to_dict())
    assert back.routed_experts.dtype == np.int16 and np.array_equal(back.routed_experts, samples[0].routed_experts)


def test_http_routes_follow_sglang_and_a_missing_field_names_the_server_flag(samples):
    from rlad_megatron.engines.client import parse_generate_response
    from rlad_megatron.engines.protocol import RequestError, encode_routed_experts, parse_generate

    s = samples[0]
    body = {
        "output_ids": s.response_ids,
        "meta_info": {
            "finish_reason": {"type": "length", "length": len(s.response_ids)},
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(s.rollout_logprobs, s.response_ids)],
            "routed_experts": encode_routed_experts(s.routed_experts),
        },
    }
    out = parse_generate_response(body, 16, routes=(len(s.prompt_ids), 2, 2))
    assert out.routed_experts.dtype == np.int16 and np.array_equal(out.routed_experts, s.routed_experts)
    with pytest.raises(ValueError, match="expected 9 tokens x 2 layers x 2 experts"):
        parse_generate_response(body, 16, routes=(len(s.prompt_ids) - 1, 2, 2))
    del body["meta_info"]["routed_experts"]
    with pytest.raises(ValueError, match="--enable-return-routed-experts"):
        parse_generate_response(body, 16, routes=(len(s.prompt_ids), 2, 2))
    (req,) = parse_generate({"input_ids": [1, 2, 3], "return_routed_experts": True}, 128, 64)
    assert req.return_routed_experts and req.routed_experts_start_len == 0
    with pytest.raises(RequestError, match=r"routed_experts_start_len=4 is out of range \[0, 3\]"):
        parse_generate({"input_ids": [1, 2, 3], "routed_experts_start_len": 4}, 128, 64)
