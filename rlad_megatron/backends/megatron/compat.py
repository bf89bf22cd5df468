"""CPU compatibility layer for Megatron-Core 0.16.1: run the real Megatron code paths without CUDA.

Idea: Megatron-Core assumes a GPU in a few dozen places (``torch.cuda.current_device()``,
``device="cuda"`` literals, ``Tensor.type() == 'torch.cuda.FloatTensor'`` checks, the CUDA RNG
tracker). Rather than forking Megatron, this module patches exactly those entry points, and only
when CUDA is absent (``activate_cpu_compat()`` is a no-op on a GPU machine and idempotent).

Patches, each with the Megatron 0.16.1 line it works around:

1. ``torch.cuda.{current_device, synchronize, manual_seed, empty_cache, current_stream,
   default_stream, stream}`` become CPU no-ops (``current_device()`` returns ``torch.device("cpu")``).
   Why: ``models/common/embeddings/rotary_pos_embedding.py:162`` moves ``inv_freq`` to
   ``torch.cuda.current_device()`` on every RoPE forward; ``tensor_parallel/mappings.py:91..181``
   (sequence-parallel all-gather / reduce-scatter buffers), ``pipeline_parallel/p2p_communication.py
   :190..321`` (send/recv buffers) and ``:242,398`` (synchronize), ``tensor_parallel/layers.py:261``,
   ``dist_checkpointing/strategies/filesystem_async.py:230`` (synchronize before a save).
2. Module-scoped ``torch`` proxies for ``pipeline_parallel/schedules.py`` (``:596, :983, :2138``
   ``total_num_tokens = torch.zeros([], ..., device="cuda")``) and
   ``distributed/param_and_grad_buffer.py:768``: factory functions called with ``device="cuda"``
   build on the CPU instead. Scoped to those modules so the hot forward/backward path pays nothing.
3. ``cuda_to_cpu()``: a ``TorchFunctionMode`` used only around optimizer construction, ``step()``
   and ``load_state_dict()``. It rewrites ``device="cuda"`` (``optimizer/optimizer.py:473,481,485,
   907``, ``optimizer/clip_grads.py:90,103,115,174,207``), makes ``Tensor.cuda()`` the identity
   (``optimizer/optimizer.py:375``, ``distrib_optimizer.py:1089``) and reports CPU float tensors as
   ``torch.cuda.*Tensor`` from ``Tensor.type()`` (the assert at ``optimizer/clip_grads.py:167`` and
   the ``TypeError: Wrapped parameters must be one of torch.cuda.FloatTensor`` at
   ``optimizer/distrib_optimizer.py:431`` / ``optimizer/optimizer.py:697``). Also used around
   ``GPTModel`` construction: with tied embeddings under pipeline parallelism
   ``models/common/language_module/language_module.py:244`` calls ``weight.data.cuda()``. A global mode would
   cost ~1.7x Python overhead on every op, hence the scoping.
4. ``CpuRNGStatesTracker`` (a ``CudaRNGStatesTracker`` subclass forking the CPU generator) and
   ``install_cpu_rng_tracker(seed)``, the CPU stand-in for ``model_parallel_cuda_manual_seed``, which
   fails at ``tensor_parallel/random.py:235`` (``torch.cuda.get_rng_state()``). Needed by sequence
   parallelism (``language_model_embedding.py:145`` always forks the tracker) and by GPU-style init.
5. ``megatron/core/transformer/moe/moe_utils.py:34`` imports ``te_general_gemm`` only inside its
   ``try: from megatron.core.extensions.transformer_engine import ...`` block, and
   ``RouterGatingLinearFunction`` (``:1192, :1225``) reads the name unconditionally: without
   Transformer Engine every MoE router forward raises ``NameError``. ``te_general_gemm = None``
   there selects the plain ``torch.matmul`` branch the function already has. Applied on GPU too
   when Transformer Engine is absent (it is a missing name, not a CUDA call).

Left out: context parallelism, CUDA graphs, ``overlap_grad_reduce`` streams (not used on CPU).
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

_ACTIVE = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _NullStream:
    """Stands in for torch.cuda.Stream: every wait/record is a no-op on a single CPU stream."""

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        return None

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, *args: Any, **kwargs: Any) -> None:
        return None


def _patch_cuda_functions() -> None:
    cuda: Any = torch.cuda  # patched in place: its typed signatures are CUDA's
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.manual_seed = lambda *a, **k: None
    cuda.manual_seed_all = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()


_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like")


def _cpu_factory(fn: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _torch_proxy() -> types.ModuleType:
    """A stand-in `torch` module whose tensor factories turn device="cuda" into the CPU."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update({k: v for k, v in vars(torch).items() if not k.startswith("__")})
    for name in _FACTORIES:
        setattr(proxy, name, _cpu_factory(getattr(torch, name)))
    return proxy


_PROXIED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.distributed.param_and_grad_buffer",
)


def _patch_module_torch() -> None:
    import importlib

    proxy = _torch_proxy()
    for name in _PROXIED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy  # type: ignore[attr-defined]


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def cuda_to_cpu() -> contextlib.AbstractContextManager:
    """Scope for Megatron optimizer calls (patch 3); a null context when CUDA is present."""
    return _CudaToCpuMode() if _ACTIVE else contextlib.nullcontext()


def define_missing_te_general_gemm() -> None:
    """Patch 5: `moe_utils.te_general_gemm = None` when Transformer Engine did not define it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def activate_cpu_compat() -> bool:
    """Install patches 1, 2 and 5 when CUDA is absent (5 also without TE). Idempotent. True when active."""
    global _ACTIVE
    define_missing_te_general_gemm()
    if _ACTIVE:
        return True
    if cuda_available():
        return False
    _patch_cuda_functions()
    _patch_module_torch()
    _ACTIVE = True
    return True


def is_active() -> bool:
    return _ACTIVE


def _tracker_base() -> type:
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    return CudaRNGStatesTracker


class _CpuForkMixin:
    """Same contract as Megatron's CudaRNGStatesTracker, with states of the CPU generator."""

    seeds_: set[int]  # both set by the tracker's own reset()
    states_: dict[str, torch.Tensor]

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"RNG seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"RNG state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def install_cpu_rng_tracker(seed: int, tp_rank: int, ep_rank: int = 0, etp_rank: int = 0):
    """CPU replacement for `model_parallel_cuda_manual_seed(seed)`, same seed offsets (patch 4)."""
    import megatron.core.tensor_parallel.random as mrandom

    tracker_cls = type("CpuRNGStatesTracker", (_CpuForkMixin, _tracker_base()), {})
    tracker = tracker_cls()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    torch.manual_seed(seed)
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    return tracker
