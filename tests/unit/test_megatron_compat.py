"""The CPU compatibility layer: idempotent activation, scoped device rewriting, the CPU RNG tracker."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.backends.megatron import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU layer is inactive with CUDA")


def test_activation_is_idempotent_and_patches_the_schedules_module():
    assert compat.activate_cpu_compat() is True
    assert compat.activate_cpu_compat() is True
    from megatron.core.pipeline_parallel import schedules

    made = schedules.torch.zeros([], dtype=torch.int, device="cuda")  # schedules.py:596 pattern
    assert made.device.type == "cpu"
    assert torch.cuda.current_device() == torch.device("cpu")


def test_scoped_mode_rewrites_devices_and_reports_cuda_types_only_inside():
    compat.activate_cpu_compat()
    t = torch.ones(2)
    with compat.cuda_to_cpu():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
        assert t.cuda() is t
    assert t.type() == "torch.FloatTensor"


def test_cpu_rng_tracker_forks_reproducibly_and_restores_the_outer_stream():
    compat.activate_cpu_compat()
    import megatron.core.tensor_parallel.random as mrandom

    tracker = compat.install_cpu_rng_tracker(123, tp_rank=1)
    assert mrandom.get_cuda_rng_tracker() is tracker
    outer = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)  # the default stream is untouched
    compat.install_cpu_rng_tracker(123, tp_rank=1)
    with mrandom.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(3), first)
    other_rank = compat.install_cpu_rng_tracker(123, tp_rank=0)
    with other_rank.fork():
        assert not torch.equal(torch.rand(3), first)  # TP ranks get different model-parallel streams
    with pytest.raises(RuntimeError, match="already exists"):
        other_rank.add("x", 123)
