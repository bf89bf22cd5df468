"""The Megatron-Core student trainer: forward-only log-probs and one optimizer step per call.

Flow of a step (`train_step`):
1. every rank receives the SAME full list of samples; `split_for_data_parallel` picks this DP
   rank's share, `make_micro_batches` packs it by token budget (`train.micro_batch_tokens`);
2. global counts (`num_tokens` = response tokens, `num_seqs` = responses of the whole step) are
   all-reduced over the DP group;
3. Megatron's `get_forward_backward_func()` runs the micro-batches (1F1B under pipeline
   parallelism); on the last stage `_loss_adapter` turns the objective's pure `(loss, metrics)`
   into Megatron's loss contract;
4. `finalize_model_grads` reduces gradients (DP, SP norms, tied embeddings), non-finite gradients
   skip the update, then the Megatron optimizer (distributed or not) clips and steps and the
   `OptimizerParamScheduler` advances.

Scaling (the only place that knows it): the objective returns each micro-batch's *share* of the
step loss, already divided by the global counts, so the step loss is the plain SUM of shares over
micro-batches and DP ranks. Megatron is therefore told not to rescale anything:
`calculate_per_token_loss=True` (no division by the number of micro-batches, DDP sums instead of
averaging over DP) and `finalize_model_grads` is called with `num_tokens=None` (no division by
Megatron's own token count). Result: gradients do not depend on DP size or micro-batch count.

Log-probs (`_token_outputs`): with `model.logprob_chunk_size > 0` (the default) the model's output
layer is bypassed during the forward (`_hidden_states_out`), so the last stage returns final hidden
states; log-probs / entropy / top-k are then computed only at the positions that carry a loss, chunk
by chunk (`logprobs.chunked_logprobs`), and scattered back into `[1, T]` columns. With 0 the model
returns logits for the whole row and the vocab-parallel functions run on all of them.

Context parallelism (CP > 1): every CP rank of a DP replica packs the same micro-batches, each
sequence padded to a multiple of 2*CP, and keeps its own two chunks of every sequence
(`batching.shard_for_context_parallel`). The objective sees only local positions; its share uses
the same global counts, so the step loss is the sum of shares over micro-batches, DP and CP ranks
(metrics are summed over the DP x CP group; Megatron's DDP sums gradients over DP x CP).
Forward-only log-probs are all-gathered over the CP group and put back in row order.

Routing replay (`model.routing_replay`, MoE students): the samples' engine routes travel as a packed
column and every student forward runs inside `ReplayRouters.replaying` (backends/megatron/routing_replay.py).

Left out: virtual pipeline stages, overlapping grad reduce / param gather with compute, fp16 loss scaling,
context parallelism with pipeline parallelism.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from rlad_megatron.backends.megatron import compat
from rlad_megatron.backends.megatron.batching import (
    PackedBatch,
    context_parallel_positions,
    filler_batch,
    make_micro_batches,
    shard_for_context_parallel,
    split_for_data_parallel,
    token_multiple,
)
from rlad_megatron.backends.megatron.logprobs import (
    chunked_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_topk_logprobs,
)
from rlad_megatron.backends.megatron.model import build_model
from rlad_megatron.backends.megatron.parallel import ParallelContext, init_parallel
from rlad_megatron.backends.megatron.routing_replay import ReplayRouters, router_rows
from rlad_megatron.types import Sample

if TYPE_CHECKING:
    from rlad_megatron.algorithms.objectives import Objective
    from rlad_megatron.config import RunConfig

PER_TOKEN_KEYS = ("teacher_logprobs", "rollout_logprobs")
"""Sample attributes copied into the batch when every sample has them (one value per response token)."""


def _finalize_without_token_scaling(model, num_tokens=None, **kwargs):
    """Megatron's finalize_model_grads, minus its division by the token count (see module doc)."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, **kwargs)


class MegatronTrainer:
    """Student trainer. `self.model` is the list of Megatron model chunks (DDP-wrapped)."""

    def __init__(
        self,
        cfg: RunConfig,
        objective: Objective,
        *,
        hf_config: Any = None,
        parallel: ParallelContext | None = None,
        weight_loader: Callable[[list, Any], None] | None = None,
    ) -> None:
        """`hf_config`: HF config or folder (default `cfg.model.student`); `weight_loader(chunks, hf_dir)`
        fills freshly built (unwrapped) chunks, e.g. from the HF safetensors."""
        self.cfg, self.objective = cfg, objective
        self.parallel = parallel or init_parallel(cfg.parallel, cfg.seed)
        self.hf_source = hf_config if hf_config is not None else cfg.model.student
        chunks = build_model(self.hf_source, cfg.model, cfg.parallel)
        if weight_loader is not None:
            weight_loader(chunks, self.hf_source)
        self.config = chunks[0].config  # Megatron's TransformerConfig
        self.vocab_size = chunks[0].vocab_size_unpadded
        self.ref_model = self._build_reference(chunks, weight_loader) if objective.needs_ref else None
        self.model = self._wrap_ddp(chunks)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.config.finalize_model_grads_func = _finalize_without_token_scaling
        self.config.no_sync_func = self.model[0].no_sync
        self.num_updates = 0
        self.replay_routers = (
            {id(chunk): ReplayRouters(chunk) for chunk in self.model} if cfg.model.routing_replay else {}
        )
        """Routing replay (model.routing_replay): the student chunks' routers, by id of the DDP chunk."""

    # ---------------------------------------------------------------- construction
    def _build_reference(self, student_chunks: list, weight_loader) -> list:
        """Frozen reference: `model.reference` if set, else a copy of the initial student."""
        ref_dir = self.cfg.model.reference
        ref = build_model(ref_dir or self.hf_source, self.cfg.model, self.cfg.parallel)
        if ref_dir and weight_loader is not None:
            weight_loader(ref, ref_dir)
        elif not ref_dir:
            for dst, src in zip(ref, student_chunks):
                dst.load_state_dict(src.state_dict())
        for chunk in ref:
            chunk.eval()
            chunk.requires_grad_(False)
        return ref

    def _wrap_ddp(self, chunks: list) -> list:
        """Float16Module (bf16 / fp16: fp32 logits out) inside Megatron DDP, as Megatron-LM does."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.transformer.module import Float16Module

        if self.config.bf16 or self.config.fp16:
            chunks = [Float16Module(c.config, c) for c in chunks]

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c) for c in chunks]

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t = self.cfg.train
        opt_config = OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            clip_grad=t.clip_grad,
            bf16=self.config.bf16,
            fp16=self.config.fp16,
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        with compat.cuda_to_cpu():
            return get_megatron_optimizer(opt_config, self.model)

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        t = self.cfg.train
        total = max(t.num_steps * t.num_minibatches * t.ppo_epochs, 1)
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if t.lr_warmup_steps else t.lr,
            max_lr=t.lr,
            min_lr=t.min_lr,
            lr_warmup_steps=t.lr_warmup_steps,
            lr_decay_steps=max(total, t.lr_warmup_steps + 1),
            lr_decay_style=t.lr_decay_style,
            start_wd=t.weight_decay,
            end_wd=t.weight_decay,
            wd_incr_steps=total,
            wd_incr_style="constant",
        )

    # ---------------------------------------------------------------- batches
    def _micro_batches(
        self, samples: Sequence[Sample], per_token: dict[str, list], topk: bool = False, routes: bool = False
    ):
        """This DP rank's packed micro-batches, and the indices (into `samples`) of its share."""
        shard = split_for_data_parallel(samples, self.parallel.data_parallel_size)[self.parallel.dp_rank]
        if not shard:
            raise ValueError(
                f"{len(samples)} samples cannot feed {self.parallel.data_parallel_size} data-parallel ranks; "
                "pass at least one sample per data-parallel rank"
            )
        mine = [samples[i] for i in shard]
        sub = {k: [v[i] for i in shard] for k, v in per_token.items()}
        multiple = token_multiple(
            self.parallel.tensor_model_parallel_size, self.config.sequence_parallel, fp8=bool(self.cfg.model.fp8)
        )
        cp = self.parallel.context_parallel_size
        if cp > 1:  # every sequence splits in 2*CP chunks; each CP rank's share of the row is a multiple too
            multiple = math.lcm(2 * cp, cp * multiple)
        experts_split = self.parallel.expert_model_parallel_size > 1

        def pack(pad_to_length: int = 0):
            return make_micro_batches(
                mine,
                sub,
                self.cfg.train.micro_batch_tokens,
                pad_to_multiple=multiple,
                uniform_length=self.parallel.pipeline_model_parallel_size > 1 or experts_split,
                topk=topk,
                pad_sequences_to=2 * cp if cp > 1 else 1,
                pad_to_length=pad_to_length,
                routes=routes,
            )

        batches = pack()
        if experts_split:
            batches = self._same_shape_over_ep(batches, pack)
        if cp > 1:
            batches = [shard_for_context_parallel(b, cp, self.parallel.cp_rank) for b in batches]
        return batches, shard

    def _same_shape_over_ep(self, batches: list[PackedBatch], pack: Callable) -> list[PackedBatch]:
        """Under EP the `allgather` token dispatcher gathers every micro-batch over the EP ranks, so each
        rank must run as many micro-batches of the same length: pad to the EP group's longest, then add
        filler batches (no samples, zero mask) up to its largest count."""
        shape = torch.tensor([len(batches), batches[0].num_tokens])
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=self.parallel.ep_group)
        count, length = int(shape[0]), int(shape[1])
        if batches[0].num_tokens < length:
            batches = pack(length)
        return batches + [filler_batch(batches[0]) for _ in range(count - len(batches))]

    def _forward_step(self, model_chunks: list, loss_fn: Callable, data_iterator, model):
        from megatron.core.packed_seq_params import PackedSeqParams

        batch: PackedBatch = next(data_iterator).to(self.parallel.device)
        t = batch.tensors
        # Under CP the boundaries are the global padded ones: every sequence (padding included) is a multiple
        # of 2*CP, and Transformer Engine / Megatron's THD RoPE divide them by CP (`*_padded` is what they
        # read when given).
        padded = batch.cu_seqlens if self.parallel.context_parallel_size > 1 else None
        packed = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=batch.cu_seqlens,
            cu_seqlens_kv=batch.cu_seqlens,
            cu_seqlens_q_padded=padded,
            cu_seqlens_kv_padded=padded,
            max_seqlen_q=batch.max_seqlen,
            max_seqlen_kv=batch.max_seqlen,
        )
        replay = self.replay_routers.get(id(model)) if "routed_experts" in t else None
        routing = contextlib.nullcontext() if replay is None else replay.replaying(self._router_rows(t))
        with self._hidden_states_out(model), routing:
            output = model(t["tokens"], t["position_ids"], None, packed_seq_params=packed)
        return output, functools.partial(loss_fn, batch)

    def _router_rows(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The engine's routes of the tokens this rank's routers see ([tokens, layers, k])."""
        return router_rows(
            tensors["routed_experts"][0],
            self.parallel.tp_rank,
            self.parallel.tensor_model_parallel_size,
            self.config.sequence_parallel,
        )

    def routing_agreement(self) -> dict[str, float]:
        """Routing replay: the share of (token, layer) pairs of the last `compute_logprobs(which="old")` whose
        own top-k expert set equals the rollout engine's (over every rank); {} without routing replay."""
        if not self.replay_routers:
            return {}
        counts = torch.stack([r.counts for r in self.replay_routers.values()]).sum(0).to(self.parallel.device)
        dist.all_reduce(counts)  # replicas (TP without SP) scale both counts alike: the ratio is unchanged
        return {"routing/agreement": float(counts[0] / counts[1])} if counts[1] > 0 else {}

    def _chunked(self) -> bool:
        return self.cfg.model.logprob_chunk_size > 0

    @contextlib.contextmanager
    def _hidden_states_out(self, model):
        """While active (chunked log-probs), the last stage's output layer passes hidden states through."""
        bare = _bare_model(model)
        if not (self._chunked() and bare.post_process):
            yield
            return
        bare.output_layer.forward = _pass_hidden_states
        try:
            yield
        finally:
            del bare.output_layer.forward

    def _output_weight(self, model_chunks: list) -> torch.Tensor:
        bare = _bare_model(model_chunks[-1])
        if bare.share_embeddings_and_output_weights:
            return bare.shared_embedding_or_output_weight()
        return bare.output_layer.weight

    def _token_outputs(
        self, batch: PackedBatch, output: torch.Tensor, weight: torch.Tensor | None, *, topk: bool, entropy: bool
    ) -> dict[str, torch.Tensor]:
        """`logprobs` [1, T] (and `student_topk_logprobs` [1, T, K], detached `entropy` [1, T]) of this rank's row.

        `output`: logits [1, T, V_local] (unchunked) or final hidden states [1, T(/TP under SP), H] (chunked),
        where only positions with `mask` get values (zeros elsewhere)."""
        t = batch.tensors
        tp_group = self.parallel.tp_group
        sampling = {"temperature": self.cfg.rollout.temperature, "vocab_size": self.vocab_size}
        if not self._chunked():
            out = {"logprobs": vocab_parallel_logprobs(output, t["targets"], tp_group, **sampling)}
            if topk:
                out["student_topk_logprobs"] = vocab_parallel_topk_logprobs(
                    output, t["teacher_topk_ids"], tp_group, **sampling
                )
            if entropy:
                with torch.no_grad():
                    out["entropy"] = vocab_parallel_entropy(output.detach(), tp_group, **sampling)
            return out
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            gather_from_sequence_parallel_region,
        )

        if weight is None:
            raise ValueError("chunked log-probs need the output-layer weight: only the last pipeline stage has it")
        hidden = output[0]  # [T or T/TP, H]
        if self.config.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, True, group=tp_group)
        elif self.parallel.tensor_model_parallel_size > 1:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
        positions = t["mask"][0].nonzero().squeeze(-1)
        chunks = chunked_logprobs(
            hidden.index_select(0, positions),
            weight,
            t["targets"][0].index_select(0, positions),
            tp_group,
            chunk_size=self.cfg.model.logprob_chunk_size,
            topk_ids=t["teacher_topk_ids"][0].index_select(0, positions) if topk else None,
            with_entropy=entropy,
            **sampling,
        )
        # hidden[:0].sum() is 0 but keeps the loss connected to the model on a rank without loss positions
        # (under CP), so its backward still runs the collectives its peers wait for.
        anchor = hidden[:0].sum()
        row = hidden.shape[0]
        out = {"logprobs": _scatter_row(chunks["logprobs"], positions, row).add(anchor).unsqueeze(0)}
        if topk:
            out["student_topk_logprobs"] = _scatter_row(chunks["topk_logprobs"], positions, row).unsqueeze(0)
        if entropy:
            out["entropy"] = _scatter_row(chunks["entropy"], positions, row).unsqueeze(0)
        return out

    def _run_schedule(
        self, model_chunks: list, batches: list[PackedBatch], loss_fn: Callable, forward_only: bool
    ) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=functools.partial(self._forward_step, model_chunks, loss_fn),
            data_iterator=iter(batches),
            model=model_chunks,
            num_microbatches=len(batches),
            seq_length=batches[0].row_tokens,  # Megatron divides by CP (and by TP under SP) itself
            micro_batch_size=1,
            forward_only=forward_only,
        )

    # ---------------------------------------------------------------- log-probs
    def _logprob_loss(self, weight: torch.Tensor | None, batch: PackedBatch, output: torch.Tensor):
        """Forward-only 'loss': no loss, the detached per-token log-probs ride in the reported dict."""
        logprobs = self._token_outputs(batch, output, weight, topk=False, entropy=False)["logprobs"]
        zero = output.new_zeros(())
        return zero, torch.zeros((), dtype=torch.int, device=output.device), {"logprobs": logprobs.detach()}

    def compute_logprobs(self, samples: Sequence[Sample], *, which: str = "old") -> list[list[float]]:
        """Log-probs of each sample's response tokens under the student ("old") or reference ("ref").

        Every rank passes the same samples and gets the full result, aligned with `response_ids`.
        """
        if which not in ("old", "ref"):
            raise ValueError(f"which={which!r}; choose 'old' or 'ref'")
        if which == "old":
            chunks = self.model
        elif self.ref_model is None:
            raise ValueError("reference log-probs requested but the objective does not need a reference model")
        else:
            chunks = self.ref_model
        replaying = bool(self.replay_routers) and which == "old"
        batches, shard = self._micro_batches(samples, {}, routes=replaying)
        for routers in self.replay_routers.values():
            routers.counts.zero_()
        for chunk in chunks:
            chunk.eval()
        weight = self._output_weight(chunks) if self.parallel.is_last_stage else None
        with torch.no_grad():
            stored = self._run_schedule(
                chunks, batches, functools.partial(self._logprob_loss, weight), forward_only=True
            )
        for chunk in chunks:
            chunk.train()
        local = {}
        if self.parallel.is_last_stage:
            for batch, out in zip(batches, stored):
                row = self._whole_row(batch, out["logprobs"][0])
                for pos, (start, end) in zip(batch.sample_indices, batch.response_spans):
                    local[shard[pos]] = row[start:end].tolist()
        return self._gather_results(local, len(samples))

    def _whole_row(self, batch: PackedBatch, local_row: torch.Tensor) -> torch.Tensor:
        """The per-token values of the whole packed row from each CP rank's part (identity without CP)."""
        if batch.cp_positions is None:
            return local_row
        cp = self.parallel.context_parallel_size
        parts = [torch.empty_like(local_row) for _ in range(cp)]
        dist.all_gather(parts, local_row.contiguous(), group=self.parallel.cp_group)
        row = local_row.new_zeros(batch.row_tokens)
        for rank, part in enumerate(parts):
            held = context_parallel_positions(batch.cu_seqlens, cp, rank).to(row.device)
            row[held] = part
        return row

    def _gather_results(self, local: dict[int, list[float]], count: int) -> list[list[float]]:
        """Collect the per-sample lists of the last stages of every DP replica onto every rank."""
        gathered: list[Any] = [None] * self.parallel.world_size
        dist.all_gather_object(gathered, local if self.parallel.is_last_stage else {})
        merged: dict[int, list[float]] = {}
        for part in gathered:
            merged.update(part)
        return [merged[i] for i in range(count)]

    # ---------------------------------------------------------------- training
    def _loss_adapter(
        self,
        weight: torch.Tensor | None,
        num_tokens: torch.Tensor,
        num_seqs: torch.Tensor,
        step: int,
        topk: bool,
        batch: PackedBatch,
        logits: torch.Tensor,
    ):
        """THE adapter: objective `(loss share, metrics)` -> Megatron `(loss, num_tokens, reported)`."""
        tensors = dict(batch.tensors)
        tensors.pop("routed_experts", None)  # consumed by the forward (routing replay), not by the objective
        tensors["mask"] = tensors["mask"].bool()
        if "teacher_mask" in tensors:
            tensors["teacher_mask"] = tensors["teacher_mask"].bool()
        outputs = self._token_outputs(batch, logits, weight, topk=topk, entropy=True)
        entropy = outputs.pop("entropy")
        tensors.update(outputs)
        loss, metrics = self.objective.loss(tensors, num_tokens=num_tokens, num_seqs=num_seqs, step=step)
        # `loss` is already this micro-batch's share of the step loss (global denominators), so it is
        # returned unscaled; the token count is only informative (finalize ignores it, see module doc).
        local_tokens = tensors["mask"].sum().to(torch.int)
        reported = {
            "loss": loss.detach().float(),
            **{k: torch.as_tensor(v).detach().float() for k, v in metrics.items()},
        }
        with torch.no_grad():  # monitoring only: token-mean share of the policy entropy
            reported["entropy"] = (entropy * tensors["mask"]).sum() / num_tokens
        return loss, local_tokens, reported

    def _global_counts(self, samples: Sequence[Sample], shard: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Response tokens and responses of the whole step: this rank's share, summed over DP."""
        counts = torch.tensor(
            [sum(len(samples[i].response_ids) for i in shard), len(shard)],
            dtype=torch.float64,
            device=self.parallel.device,
        )
        dist.all_reduce(counts, group=self.parallel.dp_group)
        return counts[0].float(), counts[1].float()

    def _per_token(
        self,
        samples: Sequence[Sample],
        advantages_per_sample: Sequence[Any],
        given: dict[str, Sequence[Sequence[float]] | None],
    ) -> dict[str, list]:
        """Per-response-token columns of the batch contract (see algorithms/objectives.py)."""
        values: dict[str, list] = {k: list(v) for k, v in given.items() if v is not None}
        values.update(
            {
                "advantages": [_per_token_advantages(a, s) for a, s in zip(advantages_per_sample, samples)],
                "rewards": [[float(s.reward)] * len(s.response_ids) for s in samples],
            }
        )
        for key in PER_TOKEN_KEYS:
            column = [getattr(s, key, None) for s in samples]
            if all(c is not None and len(c) == len(s.response_ids) for c, s in zip(column, samples)):
                values[key] = column
        if self.objective.needs_teacher:
            values["teacher_mask"] = [
                self.objective.teacher_token_mask(len(s.response_ids), s.ends_with_stop_token).float().tolist()
                for s in samples
            ]
        return values

    def forward_backward(
        self,
        samples: Sequence[Sample],
        advantages_per_sample: Sequence[Any],
        step: int,
        *,
        old_logprobs: Sequence[Sequence[float]] | None = None,
        ref_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, float]:
        """Gradients of the step loss (left in the DDP grad buffers, DP-reduced); returns metrics."""
        if len(advantages_per_sample) != len(samples):
            raise ValueError(f"{len(advantages_per_sample)} advantages for {len(samples)} samples")
        topk = bool(self.objective.teacher_top_k)
        batches, shard = self._micro_batches(
            samples,
            self._per_token(
                samples, advantages_per_sample, {"old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs}
            ),
            topk,
            routes=bool(self.replay_routers),
        )
        num_tokens, num_seqs = self._global_counts(samples, shard)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        weight = self._output_weight(self.model) if self.parallel.is_last_stage else None
        loss_fn = functools.partial(self._loss_adapter, weight, num_tokens, num_seqs, step, topk)
        reported = self._run_schedule(self.model, batches, loss_fn, forward_only=False)
        return self._reduce_metrics(reported)

    def _reduce_metrics(self, reported: list[dict]) -> dict[str, float]:
        """Sum the shares over micro-batches, DP and CP ranks; broadcast from the last pipeline stage."""
        keys: list[Any] = [sorted(reported[0]) if reported else None]
        last = self.parallel.pipeline_model_parallel_size - 1
        src = (
            dist.get_global_rank(self.parallel.pp_group, last)
            if self.parallel.pipeline_model_parallel_size > 1
            else self.parallel.rank
        )
        if self.parallel.pipeline_model_parallel_size > 1:
            dist.broadcast_object_list(keys, src=src, group=self.parallel.pp_group)
        names = keys[0]
        sums = torch.tensor(
            [sum(float(r[k]) for r in reported) for k in names] if reported else [0.0] * len(names),
            dtype=torch.float64,
            device=self.parallel.device,
        )
        dist.all_reduce(sums, group=self.parallel.dp_cp_group or self.parallel.dp_group)
        if self.parallel.pipeline_model_parallel_size > 1:
            dist.broadcast(sums, src=src, group=self.parallel.pp_group)
        return dict(zip(names, sums.tolist()))

    def _grads_finite(self) -> bool:
        flag = torch.zeros(1, device=self.parallel.device)
        for chunk in self.model:
            for buffer in chunk.buffers:
                # One reduction instead of a full-size bool mask: any NaN / Inf makes the sum non-finite.
                if not torch.isfinite(buffer.grad_data.sum()):
                    flag.fill_(1.0)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0.0

    def train_step(
        self,
        samples: Sequence[Sample],
        advantages_per_sample: Sequence[Any],
        step: int,
        *,
        old_logprobs: Sequence[Sequence[float]] | None = None,
        ref_logprobs: Sequence[Sequence[float]] | None = None,
    ) -> dict[str, float]:
        """One optimizer step over `samples` (the same full list on every rank).

        `advantages_per_sample[i]`: a scalar or one value per response token; `old_logprobs` /
        `ref_logprobs`: from `compute_logprobs`, aligned with `response_ids`. Returns metrics: the
        objective's (step values), `loss`, `grad_norm`, `lr`, `skipped` (1 = non-finite, no update).
        """
        metrics = self.forward_backward(
            samples, advantages_per_sample, step, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs
        )
        finite = math.isfinite(metrics.get("loss", 0.0)) and self._grads_finite()
        grad_norm, lr = float("nan"), float(self.optimizer.param_groups[0]["lr"])  # the lr of this update
        if finite:
            with compat.cuda_to_cpu():
                ok, grad_norm, _ = self.optimizer.step()
            finite = bool(ok) and grad_norm is not None and math.isfinite(grad_norm)
            if finite:
                self.num_updates += 1
                self.scheduler.step(increment=1)
        metrics.update(
            grad_norm=float(grad_norm if grad_norm is not None else float("nan")), lr=lr, skipped=0.0 if finite else 1.0
        )
        return metrics

    # ---------------------------------------------------------------- access for others
    def num_parameters(self) -> int:
        """Parameters of the whole model (padded vocabulary; a tied output copy on the last
        pipeline stage is not counted twice). Summed over TP and PP ranks."""
        local = 0
        for chunk in self.unwrapped_model():
            tied_copy = chunk.share_embeddings_and_output_weights and not chunk.pre_process
            local += sum(
                p.numel() for n, p in chunk.named_parameters() if not (tied_copy and n == "output_layer.weight")
            )
        total = torch.tensor([local], dtype=torch.float64, device=self.parallel.device)
        dist.all_reduce(total, group=_model_parallel_group())
        return int(total.item())

    def unwrapped_model(self) -> list:
        """The bare GPTModel chunks (no DDP / Float16Module wrapper), e.g. for weight export."""
        return [_bare_model(chunk) for chunk in self.model]


def _bare_model(chunk):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _pass_hidden_states(input_, weight=None, runtime_gather_output=None):
    """Stands in for the output layer's forward: (hidden states, no bias), as ColumnParallelLinear returns."""
    return input_, None


def _scatter_row(values: torch.Tensor, positions: torch.Tensor, row: int) -> torch.Tensor:
    """A [row, ...] float32 tensor: `values` at `positions`, zeros elsewhere (differentiable)."""
    out = values.new_zeros(row, *values.shape[1:])
    return out.index_put((positions,), values)


def _model_parallel_group():
    from megatron.core import parallel_state as mpu

    return mpu.get_model_parallel_group()


def _per_token_advantages(advantage: Any, sample: Sample) -> list[float] | None:
    """A scalar advantage is broadcast over the response; a sequence needs one value per token. None: this
    rank does not hold the sample's values (another data-parallel rank trains on it), so it has none."""
    if advantage is None:
        return None
    if isinstance(advantage, torch.Tensor):
        advantage = advantage.item() if advantage.dim() == 0 else advantage.tolist()
    if isinstance(advantage, (int, float)):
        return [float(advantage)] * len(sample.response_ids)
    values = [float(a) for a in advantage]
    if len(values) != len(sample.response_ids):
        raise ValueError(f"per-token advantages have {len(values)} values for {len(sample.response_ids)} tokens")
    return values
