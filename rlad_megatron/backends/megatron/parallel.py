"""torch.distributed + Megatron parallel state from `parallel` config, on CPU (gloo) or GPU (nccl).

`init_parallel(parallel_cfg, seed)` reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK); without it, it starts a single-process world over an in-memory store.
It then calls `parallel_state.initialize_model_parallel` and seeds the model-parallel RNG tracker:
Megatron's `model_parallel_cuda_manual_seed` with CUDA, the CPU tracker of `compat` without.
The returned `ParallelContext` carries the process groups so callers pass them on explicitly.

Context parallelism: `cp_group` (the ranks sharing one packed row) and `dp_cp_group` (data x context
parallel ranks: where per-rank loss shares and metrics are summed). Left out: virtual pipeline stages,
expert parallelism, context parallelism together with pipeline parallelism (refused).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from rlad_megatron.backends.megatron import compat
from rlad_megatron.config import CONTEXT_PARALLEL_WITH_PIPELINE


@dataclass
class ParallelContext:
    """Sizes, ranks and process groups of this rank (Megatron's names)."""

    rank: int
    world_size: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    data_parallel_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    device: torch.device
    owns_process_group: bool = False
    context_parallel_size: int = 1
    cp_rank: int = 0
    cp_group: Any = None
    dp_cp_group: Any = None
    dp_cp_rank: int = 0
    """Rank among the DP x CP ranks holding the same weights: 0 picks one copy (export, sync senders)."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_model_parallel_size - 1


def _backend(parallel_cfg) -> str:
    if parallel_cfg.backend != "auto":
        if parallel_cfg.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("parallel.backend='nccl' needs CUDA; use 'gloo' or 'auto' on a CPU machine")
        return parallel_cfg.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def _init_process_group(parallel_cfg) -> bool:
    """Start torch.distributed unless already started. Returns True when this call started it."""
    if dist.is_initialized():
        return False
    backend = _backend(parallel_cfg)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=30)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        # Not launched by torchrun: a world of one, rendezvous through an in-memory store. No port
        # is bound and os.environ is left alone, so child processes (tests, tools) that inherit it
        # never try to reuse this process's rendezvous address.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, timeout=timeout)
    return True


def _refuse_context_parallel_with_pipeline(parallel_cfg) -> None:
    """Checked again here: setting the attribute after loading skips ParallelConfig.__post_init__."""
    cp, pp = parallel_cfg.context_parallel_size, parallel_cfg.pipeline_model_parallel_size
    if cp > 1 and pp > 1:
        raise ValueError(CONTEXT_PARALLEL_WITH_PIPELINE.format(cp=cp, pp=pp))


def check_layout(parallel_cfg, world_size: int) -> int:
    """Validate the layout against the world size; return the data-parallel size."""
    tp, pp = parallel_cfg.tensor_model_parallel_size, parallel_cfg.pipeline_model_parallel_size
    cp = parallel_cfg.context_parallel_size
    _refuse_context_parallel_with_pipeline(parallel_cfg)
    if world_size % (tp * pp * cp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor({tp}) x pipeline({pp}) x context({cp}) "
            "parallel sizes; change the parallel.* sizes or the number of processes"
        )
    return world_size // (tp * pp * cp)


def init_parallel(parallel_cfg, seed: int) -> ParallelContext:
    """Initialise torch.distributed and Megatron's parallel state; seed the model-parallel RNG."""
    from megatron.core import parallel_state as mpu

    _refuse_context_parallel_with_pipeline(parallel_cfg)  # before a process group is started
    compat.activate_cpu_compat()
    owns = _init_process_group(parallel_cfg)
    world_size = dist.get_world_size()
    check_layout(parallel_cfg, world_size)
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_cfg.pipeline_model_parallel_size,
        context_parallel_size=parallel_cfg.context_parallel_size,
    )
    tp_rank = mpu.get_tensor_model_parallel_rank()
    if compat.is_active():
        compat.install_cpu_rng_tracker(seed, tp_rank=tp_rank)
    else:
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        rank=dist.get_rank(),
        world_size=world_size,
        tensor_model_parallel_size=mpu.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=mpu.get_pipeline_model_parallel_world_size(),
        data_parallel_size=mpu.get_data_parallel_world_size(),
        tp_rank=tp_rank,
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(),
        tp_group=mpu.get_tensor_model_parallel_group(),
        pp_group=mpu.get_pipeline_model_parallel_group(),
        dp_group=mpu.get_data_parallel_group(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"),
        owns_process_group=owns,
        context_parallel_size=mpu.get_context_parallel_world_size(),
        cp_rank=mpu.get_context_parallel_rank(),
        cp_group=mpu.get_context_parallel_group(),
        dp_cp_group=mpu.get_data_parallel_group(with_context_parallel=True),
        dp_cp_rank=mpu.get_data_parallel_rank(with_context_parallel=True),
    )


def destroy_parallel(ctx: ParallelContext | None = None) -> None:
    """Tear down Megatron's parallel state, and the process group when init_parallel started it."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized() and (ctx is None or ctx.owns_process_group):
        dist.destroy_process_group()
