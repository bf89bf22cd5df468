"""Context parallelism is not supported yet: CP > 1 is refused on every device, before anything starts.

The trainer never splits a packed row over context-parallel ranks, so CP > 1 would silently train on wrong
inputs on GPU. Config validation, `rlad train --dry-run`, `init_parallel` and `rlad plan` must all say so
(or, for the plan, never propose it).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlad_megatron.config import ParallelConfig, load_config

REPO = Path(__file__).resolve().parents[2]
MESSAGE = r"parallel\.context_parallel_size=2: context parallelism is not supported yet"


def test_config_validation_refuses_context_parallel():
    with pytest.raises(ValueError, match=MESSAGE):
        ParallelConfig(context_parallel_size=2)
    with pytest.raises(ValueError, match=MESSAGE):
        load_config(REPO / "examples/qwen3_kk/recipe.yaml", ["parallel.context_parallel_size=2"])
    assert ParallelConfig(context_parallel_size=1).context_parallel_size == 1


def test_dry_run_reports_context_parallel(capsys):
    from rlad_megatron.train_cli import main

    code = main(
        ["--config", str(REPO / "examples/qwen3_kk/recipe.yaml"), "parallel.context_parallel_size=2", "--dry-run"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "context_parallel_size=2" in err and "not supported yet" in err


def test_init_parallel_refuses_on_every_device_before_starting_a_process_group(monkeypatch):
    from rlad_megatron.backends.megatron import parallel

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine is refused the same way
    cfg = ParallelConfig()
    cfg.context_parallel_size = 2  # attribute assignment skips __post_init__: the backend checks again
    with pytest.raises(ValueError, match=MESSAGE):
        parallel.init_parallel(cfg, seed=0)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=MESSAGE):
        parallel.check_layout(
            SimpleNamespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, context_parallel_size=2),
            world_size=8,
        )


def test_plan_recommends_no_context_parallel_layout():
    from rlad_megatron.launch.plan import make_plan

    for recipe in ("examples/qwen3_math/recipe.yaml", "examples/qwen3_kk/recipe.yaml"):
        plan = make_plan(load_config(REPO / recipe))
        tp, pp, dp, _ = plan["recommended"]
        assert tp * pp * dp == plan["trainer_gpus"]  # every GPU is TP x PP x DP: CP is 1
        layout = plan["layout"]
        assert layout["tp"] * layout["pp"] * layout["dp"] == plan["trainer_gpus"]
