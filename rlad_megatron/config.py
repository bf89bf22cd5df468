"""The schema of a run: typed dataclasses, loaded from YAML recipes with dotted overrides.

One `RunConfig` describes a whole run. Recipes (YAML) are merged onto the dataclass
defaults with OmegaConf structured configs, which rejects unknown keys and wrong types;
each dataclass then validates its own values in `__post_init__` and raises `ValueError`
naming the field and the allowed values. The resolved config is written to
`<run_dir>/config.yaml` by `save_config`.

Upstream knobs (Megatron `TransformerConfig` fields, SGLang server arguments) are passed
through as dicts (`model.megatron`, `rollout.server_args`) instead of being re-declared.

Pure module: imports only stdlib, omegaconf and yaml.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

ALGORITHMS = ("grpo", "kdrl", "opd", "gkd", "sft", "rlad")
TEACHER_SCORED_ALGORITHMS = ("kdrl", "opd", "gkd", "rlad")
"""Algorithms whose loss compares the student's log-probs with teacher log-probs on the same tokens."""
POLICY_GRADIENT_ALGORITHMS = ("grpo", "kdrl", "opd", "rlad")
"""Algorithms with a (clipped) policy-gradient term, the term algorithm.tis_cap weights."""
DEFAULT_TIS_CAP = 2.0
"""algorithm.tis_cap when left unset and train.max_staleness > 0."""


def _choice(obj: Any, name: str, allowed: Sequence[Any]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{_section(obj)}.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check(obj: Any, name: str, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{_section(obj)}.{name}={getattr(obj, name)!r} is invalid: must be {rule}")


def _section(obj: Any) -> str:
    return getattr(obj, "_SECTION", type(obj).__name__)


@dataclass
class ModelConfig:
    _SECTION = "model"
    student: str = ""
    """Hugging Face folder of the student (config.json, safetensors, tokenizer files)."""
    teacher: str = ""
    """Hugging Face folder of the frozen teacher; required by rlad, kdrl, opd, gkd (and sft trace generation)."""
    reference: str = ""
    """Optional frozen reference model for the reference-KL term; empty means the initial student."""
    params_dtype: str = "float32"
    """Trainer parameter dtype: float32, bfloat16 or float16."""
    transformer_impl: str = "auto"
    """Layer spec: `local` (Megatron's torch layers, CPU and GPU), `transformer_engine` (GPU only), or `auto`
    (Transformer Engine when CUDA and TE are present, local otherwise)."""
    fp8: str = ""
    """FP8 recipe for Transformer Engine layers: '' (off), 'hybrid' or 'e4m3'. GPU only."""
    megatron: dict[str, Any] = field(default_factory=dict)
    """Extra Megatron `TransformerConfig` fields passed through verbatim (e.g. recompute_granularity)."""
    make_vocab_size_divisible_by: int = 128
    """The trainer pads the vocabulary to a multiple of lcm(this, TP) (Megatron's knob); padded logit
    columns are masked out of log-probs. A TP-independent value keeps checkpoints reshardable."""
    logprob_chunk_size: int = 1024
    """The trainer computes output-layer logits and log-probs / entropy / top-k only at the positions that carry
    a loss, this many positions at a time (forward and backward), so fp32 logits never exist for more than
    `logprob_chunk_size x vocab / TP` entries. 0: logits for the whole packed row at once (the simple path)."""
    routing_replay: bool = False
    """MoE students: the rollout engine returns the top-k experts it routed every token to, and the trainer's
    forwards (old log-probs and the training step) use those experts instead of its own top-k, so numerical
    differences cannot make the two route a token differently (docs/megatron_backend.md, routing replay)."""

    def __post_init__(self) -> None:
        _check(self, "make_vocab_size_divisible_by", self.make_vocab_size_divisible_by >= 1, ">= 1")
        _check(self, "logprob_chunk_size", self.logprob_chunk_size >= 0, ">= 0 (0 = no chunking)")
        _choice(self, "params_dtype", ("float32", "bfloat16", "float16"))
        _choice(self, "transformer_impl", ("auto", "local", "transformer_engine"))
        _choice(self, "fp8", ("", "hybrid", "e4m3"))


CONTEXT_PARALLEL_WITH_PIPELINE = (
    "parallel.context_parallel_size={cp} with parallel.pipeline_model_parallel_size={pp}: context parallelism "
    "is not supported together with pipeline parallelism; set one of them to 1"
)


@dataclass
class ParallelConfig:
    _SECTION = "parallel"
    tensor_model_parallel_size: int = 1
    """Tensor parallel size (Megatron's name). Must divide attention heads and KV heads."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size. Must divide the number of layers."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor_model_parallel_size > 1)."""
    context_parallel_size: int = 1
    """Context parallel size: each packed sequence is split over this many ranks (2*CP chunks, load-balanced for
    causal attention); for long responses. Not combined with pipeline parallelism."""
    use_distributed_optimizer: bool = False
    """Shard optimizer states over data-parallel ranks (Megatron's distributed optimizer)."""
    expert_model_parallel_size: int = 1
    """Expert parallel size for MoE students (Megatron's name): each EP rank holds num_experts / EP experts.
    Carved out of the data-parallel ranks, so it must divide world size / (TP x PP) and the number of experts.
    Not combined with context parallelism."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl with CUDA, gloo without), nccl or gloo."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
            "expert_model_parallel_size",
        ):
            _check(self, name, getattr(self, name) >= 1, ">= 1")
        _choice(self, "backend", ("auto", "nccl", "gloo"))
        if self.context_parallel_size > 1 and self.pipeline_model_parallel_size > 1:
            raise ValueError(
                CONTEXT_PARALLEL_WITH_PIPELINE.format(
                    cp=self.context_parallel_size, pp=self.pipeline_model_parallel_size
                )
            )
        if self.context_parallel_size > 1 and self.expert_model_parallel_size > 1:
            raise ValueError(
                f"parallel.context_parallel_size={self.context_parallel_size} with parallel.expert_model_parallel_size="
                f"{self.expert_model_parallel_size}: context parallelism is not supported together with expert "
                "parallelism; set one of them to 1"
            )
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("parallel.sequence_parallel=True needs parallel.tensor_model_parallel_size > 1")


@dataclass
class AlgorithmConfig:
    _SECTION = "algorithm"
    name: str = "rlad"
    """Objective: grpo, kdrl, opd, gkd, sft or rlad (see docs/algorithms.md)."""
    group_size: int = 8
    """Responses sampled per prompt (G)."""
    advantage_scale: str = "std"
    """Group advantage normalisation: 'std' (GRPO) or 'none' (Dr. GRPO: mean-centred only)."""
    advantage_eps: float = 1e-6
    """Added to the group std before dividing."""
    clip_low: float = 0.2
    """Lower clip: ratio is clipped at 1 - clip_low."""
    clip_high: float = 0.28
    """Upper clip: ratio is clipped at 1 + clip_high (asymmetric, DAPO / RLAD default)."""
    aggregation: str = "seq_mean_token_mean"
    """Loss aggregation: 'seq_mean_token_mean' (RLAD Eq. 1/4) or 'token_mean' (DAPO, KDRL)."""
    alpha: float = 0.5
    """TRRD weight of the OLD STUDENT in the anchor; 1.0 is exactly GRPO, 0 anchors on the teacher."""
    teacher_log_ratio_clamp: float = 1.0
    """TRRD clamps (lp - lp_T) to [-c, c]; 0 disables the clamp."""
    clamp_mode: str = "detached"
    """'detached': clamp a detached copy (gradient is always r*A*grad lp); 'live': gradient through the clamp."""
    ref_kl_coef: float = 0.0
    """Coefficient of the optional reference-KL term (0 = off)."""
    ref_kl_estimator: str = "k3"
    """Estimator for the reference KL: k1, k2 or k3."""
    kd_estimator: str = "k2"
    """KDRL reverse-KL estimator: k2 / k3 as a loss, k1 folded into the token advantage."""
    kd_coef: float = 2e-3
    """KDRL beta for the constant schedule."""
    kd_schedule: str = "constant"
    """KDRL beta schedule: 'constant' or 'annealed' (beta_t = max(start - decay * step, min))."""
    kd_coef_start: float = 5e-3
    """Annealed schedule: beta at step 0."""
    kd_coef_decay: float = 5e-5
    """Annealed schedule: beta decrease per step."""
    kd_coef_min: float = 1e-3
    """Annealed schedule: floor of beta."""
    kd_reward_mask: bool = False
    """KDRL reward-guided masking: no KD term on responses whose reward marks them correct."""
    correct_reward_threshold: float = 1.0
    """A response counts as correct when its reward >= this (reward-guided masking, offline-distillation filter)."""
    opd_coef: float = 1.0
    """On-policy distillation: per-token advantage is -opd_coef * (lp - lp_T)."""
    opd_reward_coef: float = 0.0
    """On-policy distillation: weight of the group-normalised task reward added to the advantage."""
    gkd_top_k: int = 8
    """GKD: number of teacher top-k tokens per position."""
    gkd_divergence: str = "jsd"
    """GKD divergence on the renormalised top-k: forward_kl, reverse_kl or jsd."""
    gkd_jsd_beta: float = 0.5
    """GKD generalised JSD interpolation weight (0 -> forward KL, 1 -> reverse KL)."""
    drop_final_eos_from_teacher: bool = False
    """Exclude the final EOS token from every teacher term (teacher and student may end turns differently)."""
    dynamic_sampling: bool = False
    """Drop zero-advantage groups and over-sample replacements (DAPO-style), up to max_resample_rounds."""
    max_resample_rounds: int = 3
    """Dynamic sampling: extra generation rounds before training on what was collected."""
    tis_cap: float | None = None
    """Truncated importance sampling against the rollout engine's log-probs: each token's policy-gradient term
    is weighted by min(exp(lp_old - lp_rollout), tis_cap) (docs/algorithms.md, off-policy samples). 0 = off;
    unset = 2.0 when train.max_staleness > 0 (grpo, kdrl, opd, rlad), else off."""

    def __post_init__(self) -> None:
        _choice(self, "name", ALGORITHMS)
        _check(self, "group_size", self.group_size >= 1, ">= 1")
        _choice(self, "advantage_scale", ("std", "none"))
        _choice(self, "aggregation", ("seq_mean_token_mean", "token_mean"))
        _check(self, "alpha", 0.0 <= self.alpha <= 1.0, "in [0, 1]")
        _check(self, "clip_low", 0.0 < self.clip_low < 1.0, "in (0, 1)")
        _check(self, "clip_high", self.clip_high > 0.0, "> 0")
        _check(self, "teacher_log_ratio_clamp", self.teacher_log_ratio_clamp >= 0.0, ">= 0")
        _choice(self, "clamp_mode", ("detached", "live"))
        _choice(self, "ref_kl_estimator", ("k1", "k2", "k3"))
        _choice(self, "kd_estimator", ("k1", "k2", "k3"))
        _choice(self, "kd_schedule", ("constant", "annealed"))
        _choice(self, "gkd_divergence", ("forward_kl", "reverse_kl", "jsd"))
        _check(self, "gkd_top_k", self.gkd_top_k >= 1, ">= 1")
        _check(self, "gkd_jsd_beta", 0.0 <= self.gkd_jsd_beta <= 1.0, "in [0, 1]")
        for name in (
            "kd_coef",
            "kd_coef_start",
            "kd_coef_decay",
            "kd_coef_min",
            "ref_kl_coef",
            "opd_coef",
            "opd_reward_coef",
            "advantage_eps",
        ):
            _check(self, name, getattr(self, name) >= 0.0, ">= 0")
        _check(self, "max_resample_rounds", self.max_resample_rounds >= 0, ">= 0")
        if self.tis_cap is not None:
            _check(
                self,
                "tis_cap",
                self.tis_cap == 0 or self.tis_cap >= 1,
                "0 (off) or >= 1 (a cap below 1 "
                "would shrink the weight of tokens the rollout engine and the trainer agree on)",
            )


@dataclass
class EngineConfig:
    """An inference fleet: the rollout engine (student) or the teacher scorer."""

    _SECTION = "engine"
    kind: str = "auto"
    """'embedded' (in-process torch engine), 'http' (existing SGLang-compatible servers at `urls`),
    'sglang' (launch an SGLang fleet; GPU only), or 'auto' (sglang with CUDA, embedded otherwise)."""
    urls: list[str] = field(default_factory=list)
    """Server base URLs for kind=http (a router URL or the servers themselves)."""
    num_servers: int = 1
    """kind=sglang: servers to launch."""
    server_args: dict[str, Any] = field(default_factory=dict)
    """SGLang server arguments passed through as flags (e.g. {tp_size: 8, mem_fraction_static: 0.8} -> --tp-size 8
    --mem-fraction-static 0.8), by kind=sglang fleets and by the node agent (which sets tp, ports and host)."""
    api_key: str = ""
    """Bearer key sent to the servers; read from the environment variable named by api_key_env if empty."""
    api_key_env: str = "RLAD_API_KEY"
    """Environment variable holding the API key (never written to logs or the saved config)."""
    max_concurrency: int = 64
    """Requests in flight per fleet."""
    request_timeout_s: float = 300.0
    """Per-request timeout."""
    max_retries: int = 3
    """Retries (with backoff, on another server when possible) before a request fails the step."""
    max_batch_size: int = 64
    """Embedded engine: sequences decoded together."""
    host: str = "127.0.0.1"
    """kind=sglang: address the launched servers (and router) bind to; loopback unless the trainer is remote."""
    weights_root: str = ""
    """Folder under which `rlad serve` servers accept /update_weights_from_disk paths (empty: refused)."""
    use_router: bool = True
    """kind=sglang: put sglang-router in front of the servers (client-side balancing when absent)."""
    startup_timeout_s: float = 900.0
    """kind=sglang: seconds to wait for every server's /health_generate."""
    sglang_python: str = ""
    """kind=sglang / auto: the Python interpreter that has SGLang (in the image: the base Python, beside the
    trainer's venv); empty = env RLAD_SGLANG_PYTHON, else `python`. kind=auto picks SGLang only when CUDA is present and this
    interpreter can `import sglang`."""
    health_timeout_s: float = 30.0
    """Seconds one /health probe of a server may take before it counts as down (SGLang's /health runs a
    1-token generation: 1-20 s under load)."""

    def __post_init__(self) -> None:
        _choice(self, "kind", ("auto", "embedded", "http", "sglang"))
        _check(self, "startup_timeout_s", self.startup_timeout_s > 0, "> 0")
        _check(self, "health_timeout_s", self.health_timeout_s > 0, "> 0")
        _check(self, "max_batch_size", self.max_batch_size >= 1, ">= 1")
        _check(self, "num_servers", self.num_servers >= 1, ">= 1")
        _check(self, "max_concurrency", self.max_concurrency >= 1, ">= 1")
        _check(self, "request_timeout_s", self.request_timeout_s > 0, "> 0")
        _check(self, "max_retries", self.max_retries >= 0, ">= 0")
        if self.kind == "http" and not self.urls:
            raise ValueError(f"{self._SECTION}.urls must list at least one server when {self._SECTION}.kind='http'")


@dataclass
class RolloutConfig(EngineConfig):
    _SECTION = "rollout"
    temperature: float = 1.0
    """Sampling temperature; the trainer divides its logits by the same value (see docs/rollout.md)."""
    top_p: float = 1.0
    """Nucleus sampling; log-probs are of the temperature-scaled distribution before top-p/top-k."""
    top_k: int = -1
    """Top-k sampling; -1 disables it (SGLang's convention)."""
    max_new_tokens: int = 256
    """Response length budget."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop tokens besides the tokenizer's EOS."""
    ignore_eos: bool = False
    """Generate exactly max_new_tokens per response: no token (EOS or stop_token_ids) ends one (SGLang's
    ignore_eos). For throughput benchmarks and rehearsals, where every step must cost the same; every response
    then finishes by length (the teacher mask and EOS terms treat it as unfinished)."""
    sync: str = "distributed"
    """How new weights reach rollout servers (kinds http / sglang) after each step: 'distributed' (each
    pipeline stage broadcasts its HF-named tensors to every server over a process group, SGLang's
    update_weights_from_distributed protocol; NCCL on GPU, gloo on CPU) or 'disk' (the trainer writes an HF
    folder under run_dir/weights and every server loads it; the servers must see that folder). The embedded
    engine lives in the trainer and gets tensors in memory either way."""
    sync_host: str = ""
    """Address of the trainer's sending ranks that the servers connect to for 'distributed' sync
    (empty: this host's fully qualified name)."""
    sync_timeout_s: float = 600.0
    """Seconds a weight-sync call or broadcast may take before the step fails."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice(self, "sync", ("distributed", "disk"))
        _check(self, "sync_timeout_s", self.sync_timeout_s > 0, "> 0")
        _check(self, "temperature", self.temperature > 0, "> 0")
        _check(self, "top_p", 0 < self.top_p <= 1, "in (0, 1]")
        _check(self, "top_k", self.top_k == -1 or self.top_k >= 1, "-1 or >= 1")
        _check(self, "max_new_tokens", self.max_new_tokens >= 1, ">= 1")


@dataclass
class TeacherConfig(EngineConfig):
    _SECTION = "teacher"


@dataclass
class NamedTeacherConfig(TeacherConfig):
    """One teacher of a several-teacher run (`teachers: {name: ...}`): the engine keys of `teacher:` plus the
    teacher's own model folder and, for `rlad render` / `rlad plan`, the size of its fleet."""

    _SECTION = "teachers.<name>"
    model: str = ""
    """Hugging Face folder of this teacher (what `model.teacher` is for the single `teacher:`)."""
    launch_tp: int = 0
    """Tensor-parallel size of each of this teacher's SGLang servers when the node agent launches them;
    0 = launch.teacher_tp."""
    launch_nodes: int = 0
    """Nodes of this teacher's fleet on a multi-node job; 0 = the nodes one server needs."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self, "launch_tp", self.launch_tp >= 0, ">= 0 (0 = launch.teacher_tp)")
        _check(self, "launch_nodes", self.launch_nodes >= 0, ">= 0 (0 = automatic)")


TEACHER_NAME = re.compile(r"[A-Za-z0-9_-]+")
SINGLE_TEACHER = ""
"""Name of the one teacher of a `teacher:` run (records carry no teacher name then)."""


@dataclass(frozen=True)
class Teacher:
    """One teacher as the rest of the code sees it, whichever form the config used (`teachers_of`)."""

    name: str
    """Its name in `teachers:`; SINGLE_TEACHER ('') for the `teacher:` form."""
    section: str
    """Config path of its engine settings: 'teacher' or 'teachers.<name>' (also its fleet's name)."""
    engine: EngineConfig
    model: str
    """Its Hugging Face folder."""
    tp: int
    """TP of each server the node agent launches for it."""
    nodes: int
    """Nodes of its fleet on a multi-node job; 0 = automatic."""


def teachers_of(cfg: RunConfig) -> list[Teacher]:
    """The run's teachers in config order: the one `teacher:` (with model.teacher), or each of `teachers:`."""
    la = cfg.launch
    if not cfg.teachers:
        return [Teacher(SINGLE_TEACHER, "teacher", cfg.teacher, cfg.model.teacher, la.teacher_tp, la.teacher_nodes)]
    return [
        Teacher(name, f"teachers.{name}", t, t.model, t.launch_tp or la.teacher_tp, t.launch_nodes)
        for name, t in cfg.teachers.items()
    ]


def teacher_by_section(cfg: RunConfig, section: str) -> Teacher:
    """The teacher whose engine settings (and fleet) are at config path `section`."""
    for teacher in teachers_of(cfg):
        if teacher.section == section:
            return teacher
    raise KeyError(f"no teacher at {section!r}")


@dataclass
class DataConfig:
    _SECTION = "data"
    train: str = ""
    """Training prompts: a .jsonl / .parquet file, a `datasets` folder, `task:<name>` (procedural task) or
    `reasoning_gym:<task>`."""
    eval: str = ""
    """Held-out prompts, same forms as `train`; empty disables periodic eval."""
    prompt_key: str = "prompt"
    """Row field holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Row field holding the reference answer / label."""
    solution_key: str = "solution"
    """Optional row field holding a reference response (e.g. a teacher trace): what `sft` with
    train.offline_source=dataset trains on for file sources. Rows without it fall back to the procedural
    task's trace; a present but non-string or empty value is a bad row."""
    metadata_keys: list[str] = field(default_factory=list)
    """Extra row fields kept with each sample (e.g. difficulty) and reported per value in eval."""
    template: str = "chat"
    """'chat' (tokenizer.apply_chat_template), 'plain' (plain_template.format(prompt=...)) or 'none'."""
    plain_template: str = "{prompt}"
    """Used when template='plain'."""
    max_prompt_length: int = 512
    """Prompts longer than this (in tokens) are bad rows."""
    bad_rows: str = "error"
    """Bad-row policy: 'error' (stop before training, listing file/row/field) or 'skip' (drop and count)."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Options for task: / reasoning_gym: sources (size, difficulty, ...)."""
    shuffle: bool = True
    """Shuffle prompt order each epoch (seeded, resumable)."""
    dataset_split: str = "train"
    """Split to read from a `datasets` folder source."""
    cache_dir: str = ""
    """`datasets` cache for folder sources; empty = <folder>/.cache (never ~/.cache)."""
    teacher_field: str = ""
    """Several teachers (`teachers:`): the row field naming each prompt's teacher (one of the names in
    `teachers:`). A row naming no teacher gets `teacher_default`; a row naming an unknown one is a bad row."""
    teacher_default: str = ""
    """Several teachers: the teacher of rows without `teacher_field` (or with it empty); empty = such a row
    is a bad row, unless `teachers:` lists only one teacher (which then scores every row)."""

    def __post_init__(self) -> None:
        _choice(self, "template", ("chat", "plain", "none"))
        _choice(self, "bad_rows", ("error", "skip"))
        _check(self, "max_prompt_length", self.max_prompt_length >= 1, ">= 1")


@dataclass
class RewardConfig:
    _SECTION = "reward"
    name: str = "auto"
    """Reward function: math, knights_knaves, task:<name>, reasoning_gym:<task>, or auto (from data.train)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Options of the reward function (e.g. K&K format / answer scores)."""
    timeout_s: float = 5.0
    """Per-response verification timeout (math-verify runs in a separate process)."""
    length_penalty: float = 0.0
    """Shaping: subtract length_penalty * (response tokens / max_new_tokens); 0 = off."""
    num_workers: int = 1
    """Reward worker processes (math-verify pool size; process pool for other rewards when > 1)."""

    def __post_init__(self) -> None:
        _check(self, "timeout_s", self.timeout_s > 0, "> 0")
        _check(self, "length_penalty", self.length_penalty >= 0, ">= 0")
        _check(self, "num_workers", self.num_workers >= 1, ">= 1")


@dataclass
class TrainConfig:
    _SECTION = "train"
    num_steps: int = 100
    """RL steps (one rollout batch each)."""
    prompts_per_step: int = 32
    """Prompts sampled per step; the batch holds prompts_per_step * group_size responses."""
    num_minibatches: int = 1
    """Optimizer steps per rollout batch per epoch (PPO mini-batches)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (dynamic micro-batching)."""
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    lr_warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    lr_decay_style: str = "constant"
    """constant, linear or cosine (Megatron's OptimizerParamScheduler styles)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    clip_grad: float = 1.0
    """Gradient-norm clip; 0 disables."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped)."""
    max_staleness: int = 0
    """Off-policy overlap: 0 = synchronous (generate, then train, then sync); 1 = the next step's samples are
    generated in the background while this step trains, by weights at most one update old (docs/training.md)."""
    stream_scoring: bool = True
    """Reward and teacher-score each prompt group as soon as its responses finish generating, while the rest
    still generate (false: all of them after generation). Same samples and scores either way, bit for bit."""
    save_rollouts: bool = False
    """Write every step's rollouts to <run_dir>/rollouts/step_N.jsonl (replayable by mode=train_only)."""
    mode: str = "full"
    """full, rollout_only (generate + score + save, no training) or train_only (replay saved rollouts)."""
    rollout_dir: str = ""
    """mode=train_only: folder of saved rollouts to replay."""
    offline_source: str = "teacher"
    """Where offline distillation (algorithm sft) takes its responses: 'teacher' (group_size teacher generations
    per prompt, kept when reward >= algorithm.correct_reward_threshold) or 'dataset' (each row's solution trace:
    its `solution` field, or the procedural task's trace)."""

    def __post_init__(self) -> None:
        for name in ("num_steps", "prompts_per_step", "num_minibatches", "ppo_epochs", "micro_batch_tokens"):
            _check(self, name, getattr(self, name) >= 1, ">= 1")
        _check(self, "lr", self.lr >= 0, ">= 0")
        _choice(self, "lr_decay_style", ("constant", "linear", "cosine"))
        _choice(self, "mode", ("full", "rollout_only", "train_only"))
        _choice(self, "offline_source", ("teacher", "dataset"))
        _check(self, "max_bad_steps", self.max_bad_steps >= 1, ">= 1")
        _check(self, "max_staleness", self.max_staleness in (0, 1), "0 or 1 (one step is generated ahead)")


@dataclass
class CheckpointConfig:
    _SECTION = "checkpoint"
    interval: int = 50
    """Save every N steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Complete checkpoints kept on disk."""
    save_hf: bool = True
    """Also export the final student as a Hugging Face folder (<run_dir>/hf/step_N; <run_dir>/hf/latest names it)."""


@dataclass
class EvalConfig:
    _SECTION = "eval"
    interval: int = 0
    """Evaluate on data.eval before training, every N steps and after the last step; 0 = no evaluation at all."""
    num_samples: int = 4
    """k responses per prompt (avg@k, pass@k)."""
    temperature: float = 0.6
    """Eval sampling temperature."""
    extra_temperatures: list[float] = field(default_factory=list)
    """Also evaluate at these temperatures at every eval; their metrics get the suffix `@T<t>` (avg@4@T1)."""
    top_p: float = 1.0
    """Eval nucleus sampling."""
    max_new_tokens: int = 256
    """Eval response budget."""
    max_prompts: int = 0
    """Cap on eval prompts (0 = all)."""
    batch_size: int = 64
    """Prompts per engine.generate call during eval."""
    breakdown_keys: list[str] = field(default_factory=lambda: ["difficulty"])
    """Record metadata keys reported per value (nested dicts expand: difficulty -> difficulty.n_people)."""

    def __post_init__(self) -> None:
        _check(self, "interval", self.interval >= 0, ">= 0 (0 = no evaluation)")
        _check(self, "num_samples", self.num_samples >= 1, ">= 1")
        _check(self, "batch_size", self.batch_size >= 1, ">= 1")
        _check(self, "max_prompts", self.max_prompts >= 0, ">= 0")
        _check(self, "extra_temperatures", all(t >= 0 for t in self.extra_temperatures), "a list of values >= 0")


@dataclass
class WandbConfig:
    """Weights & Biases sink beside tensorboard (the `launch` extra installs wandb). The run's config goes
    with it redacted as in config.yaml; the command line, environment and console are not sent."""

    _SECTION = "logging.wandb"
    project: str = ""
    """W&B project; '' leaves wandb off."""
    entity: str = ""
    """W&B entity (team or user); '' = the account's default."""
    mode: str = "online"
    """'online', 'offline' (writes <run_dir>/wandb only; `wandb sync` uploads it later) or 'disabled'."""

    def __post_init__(self) -> None:
        _choice(self, "mode", ("online", "offline", "disabled"))


@dataclass
class LoggingConfig:
    _SECTION = "logging"
    tensorboard: bool = True
    """Write tensorboard scalars to <run_dir>/tb."""
    progress_bar: bool = True
    """Rich progress bar with ETA and live reward, when stdout is a terminal (plain log lines otherwise)."""
    rollout_samples: int = 4
    """Responses per step written to <run_dir>/samples.jsonl for reading."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Optional W&B sink: the same scalars as tensorboard (`logging.wandb.project=NAME` turns it on)."""


GPU_TYPES = ("h100", "h200", "a100", "b200")


@dataclass
class LaunchConfig:
    """Where the run goes on a cluster: node counts, node roles, ports and the Slurm job.

    Read by `rlad render` (sbatch), `rlad plan` (capacity) and examples/nemo_run. Node-role counts of 0
    are chosen automatically (see docs/launch.md); on one node all roles share its GPUs."""

    _SECTION = "launch"
    nodes: int = 1
    """Nodes in the job."""
    gpus_per_node: int = 8
    """GPUs per node."""
    gpu: str = "h100"
    """GPU type for `rlad plan` and the sbatch constraint: h100, h200, a100 or b200."""
    trainer_nodes: int = 0
    """Nodes running the Megatron trainer (torchrun); 0 = automatic."""
    rollout_nodes: int = 0
    """Nodes running the student's SGLang rollout servers and their router; 0 = automatic."""
    teacher_nodes: int = 0
    """Nodes running the teacher's SGLang servers and their router; 0 = automatic (none if the algorithm
    needs no teacher). Several teachers (`teachers:`): leave 0 and set teachers.<name>.launch_nodes."""
    rollout_tp: int = 1
    """Tensor-parallel size of each rollout SGLang server (--tp-size)."""
    teacher_tp: int = 8
    """Tensor-parallel size of each teacher SGLang server (8 fits a 70B bf16 teacher on one H100 node;
    larger than gpus_per_node spans several nodes)."""
    master_port: int = 29500
    """torchrun rendezvous port on the first trainer node."""
    rollout_port: int = 30000
    """Port of the first rollout server on a node; further servers on the same node count up."""
    teacher_port: int = 31000
    """Port of the first teacher server on a node; further servers on the same node count up."""
    rollout_router_port: int = 30800
    """Port of the rollout router (sglang_router) on the first rollout node."""
    teacher_router_port: int = 31800
    """Port of the teacher router on the first teacher node."""
    container_image: str = ""
    """Container image for pyxis/enroot (srun --container-image); empty runs on the host environment."""
    container_mounts: list[str] = field(default_factory=list)
    """pyxis mounts, 'host_path:container_path' each."""
    partition: str = ""
    """Slurm partition (#SBATCH --partition); empty = cluster default."""
    account: str = ""
    """Slurm account (#SBATCH --account); empty = user default."""
    time_limit: str = "04:00:00"
    """Slurm wall time (HH:MM:SS or D-HH:MM:SS)."""
    job_name: str = "rlad"
    """Slurm job name."""
    health_timeout_s: int = 1800
    """Seconds to wait for every server's /health_generate before training starts."""
    server_impl: str = "sglang"
    """What the node agent starts as a server: 'sglang' (`<sglang_python> -m sglang.launch_server`) or 'rlad'
    (`python -m rlad_megatron.cli serve`, the CPU stand-in, with the same SGLang flags; tp 1 only)."""
    sglang_python: str = ""
    """Interpreter of the SGLang environment, for the servers and sglang-router; empty = env RLAD_SGLANG_PYTHON,
    else `python` (with server_impl=rlad: the agent's own interpreter, which has sglang-router in the CPU extra)."""
    restart_servers: int = 3
    """Restarts of each server (and router) per job attempt when it exits while the job runs, with back-off;
    0 = the first crash ends the node (and, through srun --kill-on-bad-exit, the job)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment exported on every node (e.g. NCCL_IB_HCA, NCCL_SOCKET_IFNAME)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "rollout_tp", "teacher_tp"):
            _check(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("trainer_nodes", "rollout_nodes", "teacher_nodes"):
            _check(self, name, getattr(self, name) >= 0, ">= 0 (0 = automatic)")
        _choice(self, "gpu", GPU_TYPES)
        ports = ("master_port", "rollout_port", "teacher_port", "rollout_router_port", "teacher_router_port")
        for name in ports:
            _check(self, name, 1024 <= getattr(self, name) <= 65535, "a port in [1024, 65535]")
        if len({getattr(self, n) for n in ports}) != len(ports):
            raise ValueError(f"launch ports {[getattr(self, n) for n in ports]} must all differ")
        fixed = self.trainer_nodes + self.rollout_nodes + self.teacher_nodes
        _check(self, "nodes", fixed <= self.nodes, f">= trainer_nodes + rollout_nodes + teacher_nodes ({fixed})")
        _check(
            self,
            "time_limit",
            bool(re.fullmatch(r"(\d+-)?\d{1,3}:\d\d(:\d\d)?", self.time_limit)),
            "HH:MM:SS or D-HH:MM:SS",
        )
        _check(self, "health_timeout_s", self.health_timeout_s >= 1, ">= 1")
        _choice(self, "server_impl", ("sglang", "rlad"))
        _check(self, "restart_servers", self.restart_servers >= 0, ">= 0 (0 = fail fast)")
        for mount in self.container_mounts:
            if ":" not in mount:
                raise ValueError(f"launch.container_mounts entry {mount!r} must look like /host/path:/container/path")


@dataclass
class RunConfig:
    """A whole run. Sections mirror the packages that read them."""

    run_dir: str = "runs/default"
    """Output folder: resolved config, checkpoints, tensorboard, samples, eval reports."""
    seed: int = 1234
    """Seed for data order, sampling and initialisation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: dict[str, NamedTeacherConfig] = field(default_factory=dict)
    """Several teachers, by name (instead of `teacher:` and model.teacher): each prompt is scored by the
    teacher its row names in `data.teacher_field` (see docs/training.md)."""
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        # One temperature rule for teacher terms: the teacher is scored at temperature 1 by every engine
        # (SGLang returns only temperature-1 log-probs for input tokens), so the student's log-probs, which use
        # rollout.temperature, are comparable with the teacher's only at rollout.temperature = 1.
        if self.algorithm.name in TEACHER_SCORED_ALGORITHMS and self.rollout.temperature != 1.0:
            raise ValueError(
                f"rollout.temperature={self.rollout.temperature} with algorithm.name={self.algorithm.name!r}: the "
                "teacher is scored at temperature 1 (SGLang's input-token log-probs are never temperature-scaled), "
                "so lp - lp_T would compare a tempered student with an untempered teacher; set "
                "rollout.temperature=1.0 (eval.temperature may differ) or use an algorithm without a teacher term"
            )
        self._check_off_policy()
        _check_teachers(self)

    def _check_off_policy(self) -> None:
        """train.max_staleness needs student rollouts to overlap with training; algorithm.tis_cap's default."""
        name, train = self.algorithm.name, self.train
        if train.max_staleness > 0 and (name == "sft" or train.mode != "full"):
            raise ValueError(
                f"train.max_staleness={train.max_staleness} overlaps the student's generation with training, but "
                f"algorithm.name={name!r} with train.mode={train.mode!r} has "
                + ("no student rollouts" if name == "sft" else "no generation and training in the same run")
                + "; set train.max_staleness=0"
            )
        if self.algorithm.tis_cap is None:
            on = train.max_staleness > 0 and name in POLICY_GRADIENT_ALGORITHMS
            self.algorithm.tis_cap = DEFAULT_TIS_CAP if on else 0.0
        elif self.algorithm.tis_cap > 0 and name not in POLICY_GRADIENT_ALGORITHMS:
            raise ValueError(
                f"algorithm.tis_cap={self.algorithm.tis_cap} weights the policy-gradient term, and "
                f"algorithm.name={name!r} has none; set algorithm.tis_cap=0 or leave it unset"
            )


def _check_teachers(cfg: RunConfig) -> None:
    """The two teacher forms (`teacher:` + model.teacher, or `teachers:` + data.teacher_field) and their links."""
    d = cfg.data
    if not cfg.teachers:
        for name in ("teacher_field", "teacher_default"):
            if getattr(d, name):
                raise ValueError(
                    f"data.{name}={getattr(d, name)!r} routes prompts to teachers, but there is no `teachers:` "
                    f"section; list the teachers (teachers.<name>.model=...) or leave data.{name} empty"
                )
        return
    names = list(cfg.teachers)
    if cfg.model.teacher or cfg.teacher != TeacherConfig():
        raise ValueError(
            f"both teacher forms are given: `teachers:` ({', '.join(names)}) and `teacher:` / model.teacher; "
            "use one: move the teacher settings and model folder into teachers.<name> (model: <folder>), "
            "or drop `teachers:`"
        )
    for name, teacher in cfg.teachers.items():
        if not TEACHER_NAME.fullmatch(name):
            raise ValueError(
                f"teachers.{name!r}: a teacher name may hold only letters, digits, '_' and '-' (it names "
                "metrics, fleets and config paths); rename it"
            )
        teacher._SECTION = f"teachers.{name}"  # later messages (engine factory) name this teacher's section
        if not teacher.model:
            raise ValueError(f"teachers.{name}.model is empty; set it to the teacher's Hugging Face folder")
    if len(names) > 1 and not d.teacher_field:
        raise ValueError(
            f"teachers: lists {len(names)} teachers ({', '.join(names)}) but data.teacher_field is empty; set it "
            "to the row field naming each prompt's teacher"
        )
    if d.teacher_default and d.teacher_default not in cfg.teachers:
        raise ValueError(
            f"data.teacher_default={d.teacher_default!r} is not a teacher; choose one of {names} or leave it empty"
        )
    if cfg.launch.teacher_nodes:
        raise ValueError(
            f"launch.teacher_nodes={cfg.launch.teacher_nodes} with `teachers:`: each teacher fleet is sized on its "
            "own; set teachers.<name>.launch_nodes instead and launch.teacher_nodes=0"
        )
    if cfg.algorithm.name == "sft" and cfg.train.offline_source == "teacher" and len(names) > 1:
        raise ValueError(
            "algorithm.name=sft with train.offline_source=teacher generates traces with one teacher; several "
            "teachers (`teachers:`) are not supported there: use train.offline_source=dataset or one teacher"
        )


def _valid_keys(path: str) -> list[str]:
    cls: Any = RunConfig
    parts = [p for p in path.split(".") if p][:-1]
    if parts[:1] == ["teachers"]:  # teachers.<name>.<key>: the keys of one named teacher
        return sorted(f.name for f in dataclasses.fields(NamedTeacherConfig)) if len(parts) == 2 else []
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields or not dataclasses.is_dataclass(fields[part].default_factory):
            return []
        cls = fields[part].default_factory
    return sorted(f.name for f in dataclasses.fields(cls))


def _friendly(err: OmegaConfBaseException) -> ValueError:
    key = getattr(err, "full_key", "") or ""
    msg = str(err).splitlines()[0]
    if "Key '" in msg and "not in" in msg or "ConfigKeyError" in type(err).__name__:
        return ValueError(f"unknown config key '{key}'; valid keys here: {', '.join(_valid_keys(key))}")
    return ValueError(f"bad value for config key '{key}': {msg}")


def parse_overrides(overrides: Sequence[str]) -> list[str]:
    """Accept `a.b=1` and `--set a.b=1` forms; return dotlist entries."""
    out: list[str] = []
    it = iter(overrides)
    for item in it:
        if item == "--set":
            item = next(it, "")
        elif item.startswith("--set="):
            item = item[len("--set=") :]
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        out.append(item)
    return out


def _load_recipe(path: Path) -> Any:
    """Read a YAML recipe; malformed YAML or a non-mapping (top level or section) is a ValueError."""
    try:
        recipe = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ValueError(f"recipe {path} is not valid YAML: {err}") from None
    if not isinstance(recipe, DictConfig):
        raise ValueError(f"recipe {path} must be a mapping of sections (model:, algorithm:, ...), not a list")
    sections = {f.name for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(f.default_factory)}
    for name in sections & set(recipe.keys()):
        value = recipe[name]
        if value is not None and not OmegaConf.is_dict(value):
            raise ValueError(f"recipe {path}: section '{name}' must be a mapping of keys, got {value!r}")
    return recipe


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML recipe <- dotted overrides, type-checked and validated."""
    try:
        cfg = OmegaConf.structured(RunConfig)
        if path is not None:
            cfg = OmegaConf.merge(cfg, _load_recipe(Path(path)))
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(parse_overrides(overrides)))
        loaded = OmegaConf.to_object(cfg)  # runs every __post_init__
        assert isinstance(loaded, RunConfig)
        return loaded
    except OmegaConfBaseException as err:
        raise _friendly(err) from None


def to_dict(cfg: RunConfig, *, redact: bool = True) -> dict[str, Any]:
    """Plain dict of the config; secrets (api_key fields) are redacted unless asked not to."""
    data = dataclasses.asdict(cfg)
    if redact:
        for section in [data["rollout"], data["teacher"], *data["teachers"].values()]:
            if section.get("api_key"):
                section["api_key"] = "<redacted>"
    return data


def save_config(cfg: RunConfig, run_dir: str | Path | None = None) -> Path:
    """Write the resolved (redacted) config to <run_dir>/config.yaml and return its path."""
    out = Path(run_dir or cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg))))
    tmp.replace(path)
    return path
