"""Memory and time formulas for `rlad plan`: pure functions of an architecture, a parallel layout and GPU figures.

Memory of the Megatron student per GPU (bytes):
* parameters of the largest pipeline stage: layers / PP of them plus the embedding (and the untied output layer
  when PP = 1), all divided by TP;
* bytes per parameter from Megatron's distributed-optimizer table (docs/source/api-guide/dist_optimizer.md):
  bf16 params with fp32 grads and fp32 Adam (main param, m, v) = 2 + 4 + 12 = 18, or 6 + 12 / DP with the
  distributed optimizer; fp32 params: 4 + 4 + 8 = 16, or 8 + 8 / DP;
* activations of one transformer layer, counted tensor by tensor as in Korthikanti et al. 2022 ("Reducing
  Activation Recomputation in Large Transformer Models", sec. 4.1) but for the blocks used here (RMSNorm, GQA,
  SwiGLU, flash attention that stores no s x s scores, no dropout), in bf16 with sequence parallelism:
  (12 s h + 4 s g + 8 s f) / TP bytes per layer, s = tokens of a packed micro-batch, h = hidden,
  g = KV heads x head dim, f = FFN size; a 1F1B pipeline holds min(PP, micro-batches) micro-batches of
  layers / PP layers on its first stage; full recompute keeps only each layer's 2 s h / TP input plus one
  layer's full set; under context parallelism each rank holds s / CP tokens of the packed row;
* logits: the log-prob step peaks at about LOGIT_COPIES fp32 `[tokens, V / TP]` tensors (logits,
  log-softmax, their gradients, the entropy's exponentials: measured in docs/benchmarks.md), with tokens
  = `model.logprob_chunk_size` when log-probs are chunked, else the rank's whole row (s / CP).
Memory of an SGLang server: bf16 weights / TP plus a KV pool of 2 (K, V) x layers x KV heads per GPU x head
dim x 2 bytes per token, filling SGLANG_MEM_FRACTION of HBM.

Time of one RL step, each phase on its own GPUs (as `launch.topology` places them):
* generate: prefill FLOPs at MFU_PREFILL, then decode steps bound by max(HBM traffic / (bandwidth x
  MBU_DECODE), FLOPs / (peak x MFU_PREFILL)); the longest response sets the number of decode steps;
* teacher score: one forward pass over prompt + response tokens at MFU_PREFILL;
* train: (old log-prob forward + PPO epochs x (forward + backward [+ recompute forward])) at MFU_TRAIN;
* weight sync: bf16 weights gathered on the GPU, then broadcast over one NIC (NCCL path) or written to and read
  from the shared file system (disk path, used by fleets that `rlad render` starts).
FLOPs per token of a forward pass: 2 x (parameters without the input embedding) + attention 4 x layers x
context x heads x head dim / 2 (causal). Left out: MoE, CPU offload, the K/V exchange of context parallelism
(its FLOPs are the same; its communication overlaps attention in Transformer Engine); overlap of phases is in
plan.py (streaming scoring only).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from rlad_megatron.launch import hardware as hw


@dataclass(frozen=True)
class Arch:
    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool

    @property
    def layer_params(self) -> int:
        """q, k, v, o projections + SwiGLU (gate, up, down) + two RMSNorms (biases ignored)."""
        h, q, g, f = self.hidden_size, self.num_attention_heads * self.head_dim, self.kv_dim, self.ffn_hidden_size
        return h * q + 2 * h * g + q * h + 3 * h * f + 2 * h

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        heads = 1 if self.tie_word_embeddings else 2
        return self.num_layers * self.layer_params + heads * self.embedding_params + self.hidden_size

    def forward_flops_per_token(self, context: float) -> float:
        """Matmul FLOPs of one token's forward pass at an average causal context length `context`."""
        matmul = 2 * (self.num_layers * self.layer_params + self.embedding_params)
        attention = 4 * self.num_layers * context * self.num_attention_heads * self.head_dim / 2
        return matmul + attention


# Architectures of known checkpoints (from their Hugging Face config.json), used when the folder is absent.
KNOWN_ARCHS = {
    "qwen3-0.6b": Arch("Qwen3-0.6B", 1024, 28, 16, 8, 128, 3072, 151936, True),
    "qwen3-1.7b": Arch("Qwen3-1.7B", 2048, 28, 16, 8, 128, 6144, 151936, True),
    "qwen3-4b": Arch("Qwen3-4B", 2560, 36, 32, 8, 128, 9728, 151936, True),
    "qwen3-8b": Arch("Qwen3-8B", 4096, 36, 32, 8, 128, 12288, 151936, False),
    "qwen3-14b": Arch("Qwen3-14B", 5120, 40, 40, 8, 128, 17408, 151936, False),
    "qwen3-32b": Arch("Qwen3-32B", 5120, 64, 64, 8, 128, 25600, 151936, False),
    "llama-3-8b": Arch("Llama-3-8B", 4096, 32, 32, 8, 128, 14336, 128256, False),
    "llama-3-70b": Arch("Llama-3-70B", 8192, 80, 64, 8, 128, 28672, 128256, False),
}


def arch_from_hf_config(config: dict, name: str = "model") -> Arch:
    """Arch from a Hugging Face config.json dict (Llama / Qwen2 / Qwen3 field names)."""
    heads = config["num_attention_heads"]
    return Arch(
        name,
        config["hidden_size"],
        config["num_hidden_layers"],
        heads,
        config.get("num_key_value_heads", heads),
        config.get("head_dim") or config["hidden_size"] // heads,
        config["intermediate_size"],
        config["vocab_size"],
        bool(config.get("tie_word_embeddings", False)),
    )


def _table_key(folder: str) -> str:
    name = Path(folder.rstrip("/")).name.lower().replace("meta-", "").replace("llama-3.1", "llama-3")
    name = re.sub(r"llama-?3", "llama-3", name)
    matches = [k for k in KNOWN_ARCHS if k in name]
    return max(matches, key=len) if matches else ""


def load_arch(folder: str) -> tuple[Arch, str]:
    """(architecture, where it came from). config.json when the folder has one, else the built-in table."""
    path = Path(folder) / "config.json"
    if folder and path.is_file():
        return arch_from_hf_config(json.loads(path.read_text()), Path(folder).name), f"{path}"
    key = _table_key(folder)
    if not key:
        raise ValueError(
            f"no config.json in {folder!r} and its name matches no built-in architecture; known: "
            f"{[a.name for a in KNOWN_ARCHS.values()]} (or point the recipe at a local model folder)"
        )
    return KNOWN_ARCHS[key], f"built-in table entry {KNOWN_ARCHS[key].name} (no {path})"


# ---------------- memory ----------------


def bytes_per_param(params_dtype: str, distributed_optimizer: bool, dp: int) -> float:
    """Weights + grads + Adam state per parameter (Megatron's table; fp32 grads and fp32 main params)."""
    if params_dtype == "float32":
        return 8 + 8 / dp if distributed_optimizer else 16
    return 6 + 12 / dp if distributed_optimizer else 18


LOGIT_COPIES = 5
"""fp32 `[tokens, V / TP]` tensors alive at the peak of the log-prob step (bench/bench_logprobs_memory.py)."""


def stage_params(arch: Arch, tp: int, pp: int) -> float:
    """Parameters held by one GPU of the largest pipeline stage."""
    embeddings = 1 if (pp > 1 or arch.tie_word_embeddings) else 2
    return (math.ceil(arch.num_layers / pp) * arch.layer_params + embeddings * arch.embedding_params) / tp


def layer_activation_bytes(arch: Arch, tokens: float, tp: int) -> float:
    """bf16 activations one layer keeps for backward, for a packed micro-batch of `tokens`, with SP."""
    s, h, g, f = tokens, arch.hidden_size, arch.kv_dim, arch.ffn_hidden_size
    return (12 * s * h + 4 * s * g + 8 * s * f) / tp


def student_memory(
    arch: Arch,
    *,
    tp: int,
    pp: int,
    dp: int,
    micro_batch_tokens: int,
    num_microbatches: int,
    params_dtype: str = "bfloat16",
    distributed_optimizer: bool = True,
    recompute: bool = False,
    cp: int = 1,
    logprob_chunk_size: int = 0,
) -> dict[str, float]:
    """Bytes per GPU of the trainer, by part: params_grads_optimizer, activations, logits, reserve, total.

    `micro_batch_tokens`: tokens of the packed row (split over `cp` context-parallel ranks);
    `logprob_chunk_size`: 0 = logits of the whole row at once."""
    states = stage_params(arch, tp, pp) * bytes_per_param(params_dtype, distributed_optimizer, dp)
    layers = math.ceil(arch.num_layers / pp)
    in_flight = min(pp, max(1, num_microbatches))
    tokens = micro_batch_tokens / cp
    per_layer = layer_activation_bytes(arch, tokens, tp)
    if recompute:
        acts = in_flight * layers * 2 * tokens * arch.hidden_size / tp + per_layer
    else:
        acts = in_flight * layers * per_layer
    logit_tokens = min(logprob_chunk_size, tokens) if logprob_chunk_size > 0 else tokens
    logits = LOGIT_COPIES * 4 * logit_tokens * arch.vocab_size / tp
    reserve = hw.RUNTIME_RESERVE_GIB * hw.GIB
    return {
        "params_grads_optimizer": states,
        "activations": acts,
        "logits": logits,
        "reserve": reserve,
        "total": states + acts + logits + reserve,
    }


def kv_bytes_per_token(arch: Arch, tp: int) -> float:
    """bf16 K and V of one token on one GPU; KV heads are split by TP, replicated when TP > KV heads."""
    heads_per_gpu = max(1, arch.num_key_value_heads // tp) if tp <= arch.num_key_value_heads else 1
    return 2 * arch.num_layers * heads_per_gpu * arch.head_dim * 2


def server_memory(
    arch: Arch,
    *,
    tp: int,
    hbm_gb: float,
    concurrent_seqs: int,
    seq_len: int,
    mem_fraction: float = hw.SGLANG_MEM_FRACTION,
) -> dict[str, float]:
    """One SGLang server's GPU: weights, the KV pool left by mem_fraction, and what the batch needs."""
    weights = 2 * arch.num_params / tp
    pool = mem_fraction * hbm_gb * hw.GB - weights
    per_token = kv_bytes_per_token(arch, tp)
    need = concurrent_seqs * seq_len * per_token
    fits = pool >= seq_len * per_token
    seqs_at_once = max(0, int(pool // (seq_len * per_token))) if pool > 0 else 0
    return {
        "weights": weights,
        "kv_pool": max(pool, 0.0),
        "kv_needed": need,
        "fits": float(fits),
        "seqs_at_once": float(seqs_at_once),
        "hbm": hbm_gb * hw.GB,
    }


# ---------------- time ----------------


def generate_seconds(
    arch: Arch,
    gpu: hw.GPU,
    *,
    tp: int,
    num_servers: int,
    num_seqs: int,
    prompt_len: float,
    response_len: float,
    max_response_len: int,
    seqs_at_once: int,
) -> float:
    """Wall time of the rollout phase: every server prefills then decodes its share, in waves of at most
    `seqs_at_once` sequences (KV pool capacity or the client's concurrency, whichever is smaller)."""
    per_server = math.ceil(num_seqs / num_servers)
    waves = math.ceil(per_server / max(1, seqs_at_once))
    batch = math.ceil(per_server / waves)
    compute = tp * gpu.bf16_tflops * 1e12 * hw.MFU_PREFILL
    bandwidth = tp * gpu.hbm_tb_s * 1e12 * hw.MBU_DECODE
    prefill = batch * prompt_len * arch.forward_flops_per_token(prompt_len / 2) / compute
    allreduce = 2 * arch.num_layers * hw.TP_ALLREDUCE_S if tp > 1 else 0.0
    weight_reads = max_response_len * 2 * arch.num_params / bandwidth
    kv_reads = batch * (prompt_len * response_len + response_len**2 / 2) * kv_bytes_per_token(arch, 1) / bandwidth
    decode_flops = batch * response_len * arch.forward_flops_per_token(prompt_len + response_len / 2) / compute
    floor = max_response_len * hw.DECODE_MIN_STEP_S
    decode = max(weight_reads + kv_reads, decode_flops, floor) + max_response_len * allreduce
    return waves * (prefill + decode)


def score_seconds(arch: Arch, gpu: hw.GPU, *, num_gpus: int, num_seqs: int, seq_len: float) -> float:
    """Teacher log-probs of the student's tokens: one prefill-style forward pass over every sequence."""
    flops = num_seqs * seq_len * arch.forward_flops_per_token(seq_len / 2)
    return flops / (num_gpus * gpu.bf16_tflops * 1e12 * hw.MFU_PREFILL)


def train_seconds(
    arch: Arch,
    gpu: hw.GPU,
    *,
    num_gpus: int,
    num_seqs: int,
    seq_len: float,
    ppo_epochs: int,
    recompute: bool,
    pp: int,
    num_microbatches: int,
    reference_forward: bool = False,
) -> float:
    """Old log-prob forward (+ reference forward) + PPO epochs x (forward + backward = 3 forwards, +1 with full
    recompute), stretched by the 1F1B pipeline bubble (PP - 1) / micro-batches."""
    forward = num_seqs * seq_len * arch.forward_flops_per_token(seq_len / 2)
    passes = 1 + int(reference_forward) + ppo_epochs * (3 + int(recompute))
    bubble = 1 + (pp - 1) / max(1, num_microbatches)
    return passes * forward * bubble / (num_gpus * gpu.bf16_tflops * 1e12 * hw.MFU_TRAIN)


def sync_seconds(arch: Arch, gpu: hw.GPU, *, same_node: bool, via: str = "nccl") -> float:
    """bf16 weights gathered and cast on the GPU, then either broadcast over NVLink (same node) or one NIC
    (via='nccl'), or written once to the shared file system and read by the rollout nodes in parallel
    (via='disk', what fleets started by `rlad render` use)."""
    payload = 2 * arch.num_params
    gather = 2 * payload / (gpu.hbm_tb_s * 1e12 * hw.HOST_EFFICIENCY)
    if via == "disk":
        return gather + payload / (hw.FS_WRITE_GB_S * hw.GB) + payload / (hw.FS_READ_GB_S * hw.GB)
    if via != "nccl":
        raise ValueError(f"unknown weight sync path {via!r}; use 'nccl' or 'disk'")
    link = gpu.nvlink_gb_s if same_node else gpu.nic_gb_s
    return gather + payload / (link * hw.GB * hw.NIC_EFFICIENCY)
