"""FP8 padding: with `model.fp8` set, every packed micro-batch is a multiple of 16 tokens (16 x TP under
sequence parallelism), as Transformer Engine's FP8 layers require, and the padding changes nothing else.

Transformer Engine is not installed here, so on CPU `model.fp8` only changes the padding: the trainer's
own CPU forward / backward must give the same log-probs, loss and gradients with and without it.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from rlad_megatron.backends.megatron.batching import token_multiple
from rlad_megatron.backends.megatron.trainer import MegatronTrainer
from rlad_megatron.config import RunConfig
from rlad_megatron.types import Sample


def _samples(n: int = 9, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    return [
        Sample(
            prompt_ids=[rng.randrange(2, 128) for _ in range(rng.randint(2, 7))],
            response_ids=[rng.randrange(2, 128) for _ in range(rng.randint(2, 9))],
            reward=float(i % 2),
            finish_reason="stop",
        )
        for i in range(n)
    ]


def _fake_trainer(fp8: str, tp: int, sp: bool, pp: int = 1, cp: int = 1):
    """Just what `MegatronTrainer._micro_batches` reads: the trainer's batching without a model."""
    cfg = RunConfig()
    cfg.model.fp8, cfg.train.micro_batch_tokens = fp8, 24
    ctx = SimpleNamespace(
        data_parallel_size=1,
        dp_rank=0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        cp_rank=cp - 1,
    )
    return SimpleNamespace(cfg=cfg, parallel=ctx, config=SimpleNamespace(sequence_parallel=sp))


def _lengths(fp8: str, tp: int, sp: bool, pp: int = 1, cp: int = 1) -> list[int]:
    """Tokens of each micro-batch on this (context-parallel) rank."""
    batches, _ = MegatronTrainer._micro_batches(_fake_trainer(fp8, tp, sp, pp, cp), _samples(), {})
    return [b.num_tokens for b in batches]


def test_token_multiple():
    assert token_multiple(4, sequence_parallel=True, fp8=False) == 4
    assert token_multiple(4, sequence_parallel=False, fp8=True) == 16
    assert token_multiple(4, sequence_parallel=True, fp8=True) == 64  # each rank's shard is a multiple of 16
    assert token_multiple(1, sequence_parallel=False, fp8=False) == 1


@pytest.mark.parametrize(
    ("tp", "sp", "pp", "multiple"),
    [(1, False, 1, 16), (2, False, 1, 16), (2, True, 1, 32), (4, True, 1, 64), (1, False, 2, 16)],
)
def test_every_trainer_micro_batch_is_fp8_aligned(tp, sp, pp, multiple):
    plain = _lengths("", tp, sp, pp)
    assert any(n % 16 for n in plain), "the samples must need padding, or this test shows nothing"
    lengths = _lengths("hybrid", tp, sp, pp)
    assert len(lengths) == len(plain) > 1
    assert all(n % multiple == 0 for n in lengths), lengths
    assert all(n - p < multiple for n, p in zip(lengths, plain)) or pp > 1  # padded no further than needed


@pytest.mark.parametrize(("tp", "sp"), [(1, False), (2, True)])
def test_every_context_parallel_shard_is_fp8_aligned(tp, sp):
    """Under CP=2 each rank's share of a row is what its FP8 layers see: a multiple of 16 (x TP under SP)."""
    lengths = _lengths("hybrid", tp, sp, cp=2)
    assert len(lengths) > 1
    assert all(n % (16 * (tp if sp else 1)) == 0 for n in lengths), lengths


@pytest.fixture(scope="module")
def trainer():
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.parallel import destroy_parallel
    from rlad_megatron.tiny_models import tiny_hf_config

    cfg = RunConfig()
    cfg.algorithm.name = "grpo"
    cfg.model.transformer_impl = "local"
    cfg.train.micro_batch_tokens, cfg.rollout.temperature = 24, 0.7
    built = MegatronTrainer(cfg, build_objective(cfg.algorithm), hf_config=tiny_hf_config("qwen3"))
    yield built
    destroy_parallel(built.parallel)


def _grads(trainer) -> torch.Tensor:
    return torch.cat([b.grad_data.detach().clone().flatten() for chunk in trainer.model for b in chunk.buffers])


def test_fp8_padding_leaves_logprobs_loss_and_grads_unchanged(trainer):
    samples = _samples()
    advantages = [1.0 if s.reward else -1.0 for s in samples]
    results = {}
    for fp8 in ("", "hybrid"):
        trainer.cfg.model.fp8 = fp8  # on CPU the flag only changes the padding (no Transformer Engine)
        batches, _ = trainer._micro_batches(samples, {})
        logprobs = trainer.compute_logprobs(samples)
        metrics = trainer.forward_backward(samples, advantages, 0, old_logprobs=logprobs)
        results[fp8] = ([b.num_tokens for b in batches], logprobs, metrics, _grads(trainer))
    trainer.cfg.model.fp8 = ""
    (plain_len, plain_lp, plain_m, plain_g), (fp8_len, fp8_lp, fp8_m, fp8_g) = results[""], results["hybrid"]
    assert all(n % 16 == 0 for n in fp8_len) and fp8_len != plain_len  # really padded further
    assert [len(r) for r in fp8_lp] == [len(s.response_ids) for s in samples]
    assert max(abs(a - b) for x, y in zip(plain_lp, fp8_lp) for a, b in zip(x, y)) < 1e-5
    assert fp8_m["loss"] == pytest.approx(plain_m["loss"], abs=1e-6)
    assert plain_g.abs().max() > 0 and (fp8_g - plain_g).abs().max() < 1e-6
