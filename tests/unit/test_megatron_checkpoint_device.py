"""Collectives of the checkpoint save run on the trainer's device.

On GPU the default process group is NCCL, which only takes CUDA tensors: a CPU tensor fails with
"No backend type associated with device type cpu". Here the collectives are replaced by an NCCL-like
stand-in that accepts only tensors on the trainer's device (a fake `ctx.device` of `meta`, which
no CPU default can match) and stops the save at the first collective.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from rlad_megatron.backends.megatron import checkpoint


class _Collective(Exception):
    """Raised by the stand-in once it has seen the tensor (a meta tensor holds no value to go on with)."""


def _nccl_like(device: torch.device, seen: list):
    def all_reduce(tensor, *args, **kwargs):
        if tensor.device != device:
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")
        seen.append(tensor.device)
        raise _Collective

    return all_reduce


def test_save_checkpoint_collective_uses_the_trainer_device(tmp_path, monkeypatch):
    device, seen = torch.device("meta"), []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: None)
    monkeypatch.setattr(dist, "all_reduce", _nccl_like(device, seen))
    optimizer = SimpleNamespace(optimizer=SimpleNamespace(state={}))  # a Megatron optimizer that never stepped
    trainer = SimpleNamespace(optimizer=optimizer, parallel=SimpleNamespace(device=device))
    with pytest.raises(_Collective):
        checkpoint.save_checkpoint(trainer, tmp_path, step=1)
    assert seen == [device]
