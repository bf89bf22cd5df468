"""GPU and interconnect figures used by `rlad plan`, with their sources, plus the efficiency assumptions.

Peak numbers are vendor datasheet values (dense, no sparsity). Efficiencies (MFU, bandwidth utilisation) are
assumptions stated here once, not fitted to any measured run; docs/scaling.md compares the resulting
estimates with published step times and reports the error.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    hbm_gb: float
    """HBM capacity, GB (1e9 bytes)."""
    hbm_tb_s: float
    """HBM bandwidth, TB/s."""
    nvlink_gb_s: float
    """NVLink bandwidth per GPU, GB/s, one direction."""
    nic_gb_s: float
    """Inter-node bandwidth of one NIC, GB/s (one NIC per GPU in the reference systems)."""
    source: str


GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOPS bf16 dense (1,979 with sparsity), 80 GB HBM3,
    # 3.35 TB/s, NVLink 900 GB/s bidirectional; DGX H100: 8x ConnectX-7 400 Gb/s NDR.
    "h100": GPU("H100 SXM 80GB", 989.0, 80.0, 3.35, 450.0, 50.0, "NVIDIA H100 datasheet; DGX H100 user guide"),
    # NVIDIA H200 datasheet (SXM): same tensor cores as H100, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s.
    "h200": GPU("H200 SXM 141GB", 989.0, 141.0, 4.8, 450.0, 50.0, "NVIDIA H200 datasheet"),
    # NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS bf16 dense, 2,039 GB/s, NVLink 600 GB/s; DGX A100: 8x HDR 200 Gb/s.
    "a100": GPU("A100 SXM 80GB", 312.0, 80.0, 2.039, 300.0, 25.0, "NVIDIA A100 datasheet; DGX A100 user guide"),
    # NVIDIA DGX B200 datasheet: 1,440 GB HBM3e per 8 GPUs, 64 TB/s total; 2.25 PFLOPS bf16 dense per GPU
    # (HGX B200 spec), NVLink 5 1.8 TB/s bidirectional, 8x ConnectX-7 400 Gb/s.
    "b200": GPU("B200 180GB", 2250.0, 180.0, 8.0, 900.0, 50.0, "NVIDIA DGX B200 / HGX B200 datasheets"),
}

# ---- efficiency assumptions (stated, not fitted) ----
MFU_TRAIN = 0.35
"""Model FLOPs utilisation of Megatron training with packed variable-length micro-batches. Megatron-LM reports
up to ~47% MFU on H100 for large dense GPTs at fixed length; RL batches are smaller and ragged, so lower."""
MFU_PREFILL = 0.50
"""Utilisation of compute-bound prefill / scoring forward passes in SGLang (large token batches)."""
MBU_DECODE = 0.60
"""Fraction of HBM bandwidth reached by memory-bound decode steps (weights + KV cache read every step)."""
TP_ALLREDUCE_S = 15e-6
"""Latency of one small NVLink all-reduce in a decode step; a TP>1 decode step has two per layer."""
NIC_EFFICIENCY = 0.80
"""Achieved / line rate of a large NCCL broadcast over one NIC."""
HOST_EFFICIENCY = 0.70
"""Achieved / peak HBM bandwidth for the on-GPU gather and dtype cast of weights before sending."""
FS_WRITE_GB_S = 5.0
"""Shared file system write bandwidth of one client node (Lustre / GPFS over one 200-400 Gb/s link)."""
FS_READ_GB_S = 5.0
"""Shared file system read bandwidth of one client node; rollout nodes read in parallel."""
RUNTIME_RESERVE_GIB = 5.0
"""Per-GPU memory not available to tensors: CUDA context, NCCL buffers, allocator fragmentation (rule of thumb)."""
SGLANG_MEM_FRACTION = 0.85
"""SGLang's mem_fraction_static when the recipe does not set it: share of HBM for weights + KV pool."""
DECODE_MIN_STEP_S = 4e-3
"""Floor on one decode step (scheduler, sampling and kernel-launch overhead) for small models / batches."""


def gpu(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPUS)}") from None
