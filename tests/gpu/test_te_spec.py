"""Transformer Engine layer spec and FP8 training (GPU only; skipped on CPU machines).

Single process (world size 1, NCCL). The TE spec fuses the input norm into `linear_qkv`
(`TELayerNormColumnParallelLinear`), but Megatron's sharded state dict maps the local spec's
names onto the same checkpoint keys, so a checkpoint written by the local spec loads into the
TE spec: that is how the two are compared here.
"""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu


def _cfg(run_dir, impl, fp8="", dtype="bfloat16"):
    from rlad_megatron.config import RunConfig

    cfg = RunConfig(run_dir=str(run_dir))
    cfg.algorithm.name = "grpo"
    cfg.model.transformer_impl, cfg.model.fp8, cfg.model.params_dtype = impl, fp8, dtype
    cfg.train.lr, cfg.train.micro_batch_tokens = 1e-4, 256
    return cfg


def _samples(n=8):
    from rlad_megatron.types import Sample

    rng = random.Random(0)
    return [
        Sample(
            prompt_ids=[rng.randrange(2, 128) for _ in range(16)],
            response_ids=[rng.randrange(2, 128) for _ in range(rng.randint(8, 32))],
            reward=float(i % 2),
        )
        for i in range(n)
    ]


def _trainer(cfg):
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.tiny_models import tiny_hf_config

    hf = tiny_hf_config("qwen2", hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
    return MegatronTrainer(cfg, build_objective(cfg.algorithm), hf_config=hf)


def _teardown(trainer):
    from rlad_megatron.backends.megatron.parallel import destroy_parallel

    destroy_parallel(trainer.parallel)


def test_te_spec_builds_te_modules_and_matches_local_spec_logprobs(tmp_path):
    pytest.importorskip("transformer_engine")
    from megatron.core.extensions.transformer_engine import (
        TELayerNormColumnParallelLinear,
    )

    from rlad_megatron.backends.megatron.checkpoint import load_latest, save_checkpoint

    samples = _samples()
    local = _trainer(_cfg(tmp_path, "local"))
    local_lp = local.compute_logprobs(samples)
    save_checkpoint(local, tmp_path, 0, {})
    _teardown(local)
    te = _trainer(_cfg(tmp_path, "transformer_engine"))
    modules = list(te.unwrapped_model()[0].modules())
    assert any(isinstance(m, TELayerNormColumnParallelLinear) for m in modules)
    load_latest(te, tmp_path)
    te_lp = te.compute_logprobs(samples)
    diff = max(abs(a - b) for x, y in zip(local_lp, te_lp) for a, b in zip(x, y))
    assert diff < 5e-2  # bf16 kernels differ (cuDNN / fused attention vs SDPA)
    _teardown(te)


def test_fp8_hybrid_train_step_is_finite_and_updates(tmp_path):
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (Ada / Hopper)")
    trainer = _trainer(_cfg(tmp_path, "transformer_engine", fp8="hybrid"))
    assert trainer.config.fp8 == "hybrid"
    samples = _samples()
    # Unpadded rows would trip TE's FP8 shape check (assert_dim_for_fp8_exec); the trainer pads them to 16.
    assert sum(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples) % 16
    batches, _ = trainer._micro_batches(samples, {})
    assert all(b.num_tokens % 16 == 0 for b in batches)
    old = trainer.compute_logprobs(samples)
    metrics = trainer.train_step(samples, [1.0 if s.reward else -1.0 for s in samples], 0, old_logprobs=old)
    assert metrics["skipped"] == 0.0 and metrics["grad_norm"] > 0
    new = trainer.compute_logprobs(samples)
    assert max(abs(a - b) for x, y in zip(old, new) for a, b in zip(x, y)) > 0
    _teardown(trainer)
