"""Atomic, reshardable checkpoints of the trainer with Megatron `dist_checkpointing` (torch_dist).

Layout under `<run_dir>/checkpoints/`:

    step_N/        a complete checkpoint (model, optimizer, scheduler, step, extra_state)
    step_N.tmp/    a save in progress; never loaded, removed by the next save
    latest         text file holding "step_N", replaced atomically (os.replace)

A save writes everything into `step_N.tmp/`, all ranks meet at a barrier, then rank 0 renames
the folder to `step_N/` and only then points `latest` at it. A crash at any point before the
`os.replace` leaves `latest` on the previous complete checkpoint, so a half-written one is never
loaded. Older checkpoints beyond `keep_last` are deleted after the pointer moved.

Model and optimizer state are saved as sharded tensors, so a checkpoint loads under another
TP / PP / DP layout. The distributed optimizer uses `distrib_optim_sharding_type="dp_reshardable"`
(its `fully_reshardable` format fails on torch AdamW's per-param `step` in Megatron 0.16.1): that
format reshards across DP sizes but not across TP / PP sizes; to change TP / PP with the
distributed optimizer, load with `load_optimizer=False` (model, scheduler and extra_state only).
`extra_state` (step, RNG states, data position, ...) is common state written by rank 0: it must be
picklable and identical on all ranks.

An optimizer that has never stepped has no state (torch AdamW creates `exp_avg`, `exp_avg_sq` and
`step` lazily), and the distributed optimizer cannot describe it: `DistributedOptimizer.state_dict`
(Megatron-Core 0.16.1 `optimizer/distrib_optimizer.py:641-642`) asserts that the params' `step`
values form exactly one value, and there are none. Such a save is therefore model-only with
`optimizer_saved=False` in the common state; loading it restores the model and resets the
optimizer to fresh (no state), which then steps exactly as a never-saved fresh one.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlad_megatron.backends.megatron import compat

_STEP_DIR = re.compile(r"^step_(\d+)$")
_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _model_sharded_state_dict(trainer) -> dict[str, Any]:
    chunks = trainer.unwrapped_model()
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _sharded_state_dict(trainer, *, is_loading: bool, with_optimizer: bool) -> dict[str, Any]:
    state = _model_sharded_state_dict(trainer)
    if with_optimizer:
        model_state = dict(state)
        with compat.cuda_to_cpu():
            state["optimizer"] = trainer.optimizer.sharded_state_dict(
                model_state if len(model_state) > 1 else model_state["model"],
                is_loading=is_loading,
                metadata=_OPT_METADATA,
            )
    return state


def _torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a Megatron optimizer (one, or several for a ChainedOptimizer)."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def _optimizer_has_state(optimizer, device: torch.device) -> bool:
    """True once any rank's optimizer stepped. Collective (MAX over the world), so that every rank
    takes the same save path even if a rank's distributed-optimizer shard is empty. The flag lives on
    the trainer's device: with CUDA the default group is NCCL, which has no CPU tensors."""
    has_state = torch.tensor([int(any(len(opt.state) > 0 for opt in _torch_optimizers(optimizer)))], device=device)
    if dist.is_initialized():
        dist.all_reduce(has_state, op=dist.ReduceOp.MAX)
    return bool(has_state.item())


def _reset_to_fresh_optimizer(optimizer) -> None:
    """Drop all optimizer state (Adam moments, step); torch re-creates it at the next step exactly
    as for a new optimizer."""
    for opt in _torch_optimizers(optimizer):
        opt.state.clear()


def _give_fresh_state_a_step(optimizer) -> None:
    """Loading into a never-stepped distributed optimizer (a restarted job) also goes through
    `DistributedOptimizer.state_dict`, whose one-`step` assertion (Megatron-Core 0.16.1
    `optimizer/distrib_optimizer.py:641-642`, torch Adam without Apex / TE) fails on empty state. Give every
    param the state torch's first step creates (step 0, zero moments); the load then overwrites all of it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for megatron_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(megatron_opt, DistributedOptimizer):
            continue
        for group in megatron_opt.optimizer.param_groups:
            for param in group["params"]:
                state = megatron_opt.optimizer.state[param]
                if not state:
                    state.update(
                        step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param)
                    )


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    with open(tmp, "w") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, root / "latest")


def save_checkpoint(
    trainer, run_dir: str | Path, step: int, extra_state: dict | None = None, keep_last: int = 2
) -> Path:
    """Collective: every rank calls it. Returns the final `step_N` folder."""
    from megatron.core import dist_checkpointing

    root = checkpoint_root(run_dir)
    final, tmp = root / f"step_{step}", root / f"step_{step}.tmp"
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    # Before the first update there is no optimizer state to save (see the module docstring).
    with_optimizer = _optimizer_has_state(trainer.optimizer, trainer.parallel.device)
    state = _sharded_state_dict(trainer, is_loading=False, with_optimizer=with_optimizer)
    state.update(
        step=step,
        scheduler=trainer.scheduler.state_dict(),
        extra_state=dict(extra_state or {}),
        num_updates=trainer.num_updates,
        optimizer_saved=with_optimizer,
    )
    dist_checkpointing.save(state, str(tmp), content_metadata=dict(_OPT_METADATA))
    _barrier()  # every rank finished writing before the checkpoint becomes visible
    if _is_rank0():
        _publish(root, tmp, final)
        _prune(root, keep_last)
    _barrier()
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _write_latest(root, final.name)


def _prune(root: Path, keep_last: int) -> None:
    """Delete stale `*.tmp` folders of crashed saves and complete checkpoints beyond keep_last."""
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if keep_last <= 0:
        return
    steps = sorted(int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    latest = latest_checkpoint(root.parent)
    for old in steps[:-keep_last]:
        path = root / f"step_{old}"
        if latest is None or path != latest:
            shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder `latest` points at, or None when there is no complete checkpoint."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not _STEP_DIR.match(path.name) or not path.is_dir():
        raise RuntimeError(f"{pointer} points at {path.name!r}, which is not a complete checkpoint folder")
    return path


def load_latest(trainer, run_dir: str | Path, *, load_optimizer: bool = True) -> tuple[int, dict] | None:
    """Collective. Restore the latest complete checkpoint into `trainer`; (step, extra_state) or None."""
    path = latest_checkpoint(run_dir)
    if path is None:
        return None
    return load_checkpoint(trainer, path, load_optimizer=load_optimizer)


def load_checkpoint(trainer, path: str | Path, *, load_optimizer: bool = True) -> tuple[int, dict]:
    """Collective. Restore the checkpoint folder `path`; returns (step, extra_state)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / "metadata.json").exists():
        raise ValueError(f"{path} is not a complete checkpoint (no metadata.json)")
    common = dist_checkpointing.load_common_state_dict(str(path))
    # A model-only checkpoint (saved before the first update) means "fresh optimizer". Checkpoints
    # written before the `optimizer_saved` marker existed skipped the optimizer at num_updates == 0.
    optimizer_saved = bool(common.get("optimizer_saved", int(common["num_updates"]) > 0))
    reset_optimizer = load_optimizer and not optimizer_saved
    load_optimizer = load_optimizer and optimizer_saved
    if load_optimizer:
        _give_fresh_state_a_step(trainer.optimizer)
    state = _sharded_state_dict(trainer, is_loading=True, with_optimizer=load_optimizer)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(trainer.unwrapped_model()):
        chunk.load_state_dict(loaded["model" if len(trainer.model) == 1 else f"model{i}"])
    if load_optimizer:
        # Megatron 0.16.1 distrib_optimizer.py:940 copies into views of leaf params in place.
        with torch.no_grad(), compat.cuda_to_cpu():
            trainer.optimizer.load_state_dict(loaded["optimizer"])
    else:
        if reset_optimizer:
            _reset_to_fresh_optimizer(trainer.optimizer)
        # The model changed outside the optimizer: bf16/fp16 optimizers keep fp32 main copies of
        # the params that must follow it (Megatron's `reload_model_params` contract).
        with torch.no_grad(), compat.cuda_to_cpu():
            trainer.optimizer.reload_model_params()
    trainer.scheduler.load_state_dict(loaded["scheduler"])
    trainer.num_updates = int(loaded["num_updates"])
    return int(loaded["step"]), dict(loaded["extra_state"])
