"""Context parallelism is accepted alone and with TP, and refused with pipeline parallelism, before anything starts.

The CP maths (loss, gradients and log-probs equal single process) is tested in
tests/distributed/test_context_parallel.py; here: the configuration surface and the batch sharding.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlad_megatron.backends.megatron.batching import (
    context_parallel_gather_order,
    pack_samples,
    shard_for_context_parallel,
)
from rlad_megatron.config import ParallelConfig, load_config
from rlad_megatron.types import Sample

REPO = Path(__file__).resolve().parents[2]
MESSAGE = r"context_parallel_size=2 with parallel\.pipeline_model_parallel_size=2: .*not supported together"


def test_config_accepts_context_parallel_and_refuses_it_with_pipeline_parallel():
    assert ParallelConfig(context_parallel_size=2, tensor_model_parallel_size=2).context_parallel_size == 2
    with pytest.raises(ValueError, match=MESSAGE):
        ParallelConfig(context_parallel_size=2, pipeline_model_parallel_size=2)
    overrides = ["parallel.context_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    with pytest.raises(ValueError, match=MESSAGE):
        load_config(REPO / "examples/qwen3_kk/recipe.yaml", overrides)


def test_dry_run_reports_context_parallel_with_pipeline(capsys):
    from rlad_megatron.train_cli import main

    recipe = str(REPO / "examples/qwen3_kk/recipe.yaml")
    overrides = ["parallel.context_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
    code = main(["--config", recipe, *overrides, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "context_parallel_size=2" in err and "not supported together with pipeline" in err


def test_init_parallel_refuses_cp_with_pp_before_starting_a_process_group():
    from rlad_megatron.backends.megatron import parallel

    cfg = ParallelConfig()
    cfg.context_parallel_size, cfg.pipeline_model_parallel_size = 2, 2  # skips __post_init__
    with pytest.raises(ValueError, match=MESSAGE):
        parallel.init_parallel(cfg, seed=0)
    assert not dist.is_initialized()
    layout = SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=2, context_parallel_size=2)
    with pytest.raises(ValueError, match=MESSAGE):
        parallel.check_layout(layout, world_size=8)
    layout.pipeline_model_parallel_size = 1
    assert parallel.check_layout(layout, world_size=8) == 4  # DP = 8 / (TP x CP)


def _samples():
    # input lengths 5, 8 and 3 (prompt + response - 1): none a multiple of 2 x CP = 4
    shapes = [(2, 4), (3, 6), (1, 3)]
    return [Sample(prompt_ids=list(range(10, 10 + p)), response_ids=list(range(50, 50 + r))) for p, r in shapes]


def test_sharding_pads_each_sequence_and_gives_rank_r_chunks_r_and_2cp_minus_1_minus_r():
    batch = pack_samples(_samples(), {"advantages": [[1.0] * 4, [2.0] * 6, [3.0] * 3]}, pad_sequences_to=4)
    assert batch.cu_seqlens.tolist() == [0, 8, 16, 20]  # 5 -> 8, 8 -> 8, 3 -> 4
    assert batch.tensors["mask"].sum().item() == 13  # padding carries no loss
    shards = [shard_for_context_parallel(batch, 2, rank) for rank in (0, 1)]
    # sequence [0, 8): chunks of 2 -> rank 0: 0,1 and 6,7; rank 1: 2,3 and 4,5; [16, 20): chunks of 1
    assert shards[0].cp_positions.tolist() == [0, 1, 6, 7, 8, 9, 14, 15, 16, 19]
    assert shards[1].cp_positions.tolist() == [2, 3, 4, 5, 10, 11, 12, 13, 17, 18]
    for shard in shards:
        for key, column in batch.tensors.items():
            assert torch.equal(shard.tensors[key], column[:, shard.cp_positions]), key
    # all-gather order: the rank-major concatenation of the shards, put back in row order
    gathered = torch.cat([s.cp_positions for s in shards])
    order = context_parallel_gather_order(batch.cu_seqlens.diff().tolist(), 2)
    assert torch.equal(gathered[order], torch.arange(20))


def test_sharding_refuses_sequences_that_are_not_multiples_of_2cp():
    batch = pack_samples(_samples())
    with pytest.raises(ValueError, match="not multiples of 2 x context_parallel_size=4"):
        shard_for_context_parallel(batch, 2, 0)
