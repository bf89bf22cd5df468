"""torchrun worker for test_megatron_parallel.py (no tests here; run with 2 gloo processes).

One launch walks through several layouts in the same 2-process world, re-initialising Megatron's
parallel state for each: DP=2, TP=2, TP=2 + SP, PP=2. The reference is a plain single-process
forward/backward of the full batch on the unwrapped TP=1 model (padded layout, torch
log_softmax, no collectives). Weights travel between layouts through the trainer's own
checkpoints (save at one layout, load at another). Measured differences go to a JSON file that
the pytest side asserts on.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import tempfile

import torch
import torch.distributed as dist

VOCAB = 125  # padded to 128: exercises the vocabulary-padding mask
TEMPERATURE = 0.7


def make_cfg(tp=1, pp=1, sp=False, dist_opt=False):
    from rlad_megatron.config import RunConfig

    cfg = RunConfig()
    cfg.algorithm.name = "grpo"
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    cfg.parallel.sequence_parallel, cfg.parallel.use_distributed_optimizer = sp, dist_opt
    cfg.train.micro_batch_tokens, cfg.train.lr, cfg.train.clip_grad = 24, 1e-2, 1.0
    cfg.rollout.temperature = TEMPERATURE
    return cfg


def make_samples(n=6, seed=0):
    from rlad_megatron.types import Sample

    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 6))]
        response = [rng.randrange(2, VOCAB) for _ in range(rng.randint(2, 8))]
        out.append(Sample(prompt_ids=prompt, response_ids=response, reward=float(i % 3 == 0), finish_reason="stop"))
    return out


def make_trainer(cfg):
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.tiny_models import tiny_hf_config

    hf = tiny_hf_config("qwen3", vocab_size=VOCAB)
    return MegatronTrainer(cfg, build_objective(cfg.algorithm), hf_config=hf)


def inputs(samples):
    """Advantages per sample and perturbed old log-probs (ratios != 1, some clipped)."""
    rng = random.Random(1)
    adv = [rng.uniform(-1.5, 1.5) for _ in samples]
    return adv


def old_logprobs_for(trainer, samples):
    rng = random.Random(2)
    base = trainer.compute_logprobs(samples)
    return [[v + rng.uniform(-0.3, 0.3) for v in row] for row in base]


def reference_loss_and_grads(trainer, samples, adv, old):
    """Full batch, padded layout, torch log_softmax, plain autograd on the unwrapped TP=1 model."""
    from rlad_megatron.backends.megatron.batching import pad_samples

    model = trainer.unwrapped_model()[0]
    batch = pad_samples(samples)
    logits = model(batch["tokens"], batch["position_ids"], None)[..., :VOCAB].float()
    logp = torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)
    mask = batch["mask"]
    tensors = {
        "logprobs": logp,
        "mask": mask.bool(),
        "advantages": torch.zeros_like(mask),
        "old_logprobs": torch.zeros_like(mask),
        "seq_weights": torch.zeros_like(mask),
    }
    for i, s in enumerate(samples):
        start, n = len(s.prompt_ids) - 1, len(s.response_ids)
        tensors["advantages"][i, start : start + n] = adv[i]
        tensors["old_logprobs"][i, start : start + n] = torch.tensor(old[i])
        tensors["seq_weights"][i, start : start + n] = 1.0 / n
    num_tokens = float(sum(len(s.response_ids) for s in samples))
    loss, _ = trainer.objective.loss(tensors, num_tokens=num_tokens, num_seqs=float(len(samples)), step=0)
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    loss.backward()
    grads = full_tensors(trainer, grads=True)
    padded_lp = [
        logp[i, len(s.prompt_ids) - 1 : len(s.prompt_ids) - 1 + len(s.response_ids)].tolist()
        for i, s in enumerate(samples)
    ]
    return float(loss), grads, padded_lp


def full_tensors(trainer, grads: bool):
    """{global name: full tensor} of params (or their main_grad), gathered over TP and PP."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    ctx, model = trainer.parallel, trainer.unwrapped_model()[0]
    offset = get_transformer_layer_offset(model.config)
    out = {}
    for name, p in model.named_parameters():
        t = (p.main_grad if grads else p.data).detach().clone()
        if getattr(p, "tensor_model_parallel", False) and ctx.tensor_model_parallel_size > 1:
            parts = [torch.empty_like(t) for _ in range(ctx.tensor_model_parallel_size)]
            dist.all_gather(parts, t.contiguous(), group=ctx.tp_group)
            if "linear_fc1" in name:  # each shard is [gate_i; up_i]
                halves = [x.chunk(2, dim=0) for x in parts]
                t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                t = torch.cat(parts, dim=p.partition_dim)
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights and not model.pre_process:
            continue
        out[re.sub(r"layers\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + offset}.", name)] = t
    parts = [None] * ctx.world_size
    dist.all_gather_object(parts, out if ctx.tp_rank == 0 and ctx.dp_rank == 0 else {})
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def lp_diff(x, y) -> float:
    return max(abs(u - v) for rx, ry in zip(x, y) for u, v in zip(rx, ry))


def check_vocab_parallel(trainer, results):
    """Log-probs / entropy / top-k from TP-sharded logits vs full log_softmax (values and grads)."""
    from rlad_megatron.backends.megatron.logprobs import (
        logprobs_and_entropy,
        vocab_parallel_topk_logprobs,
    )

    ctx = trainer.parallel
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(3, 7, 128, generator=gen) * 3
    targets = torch.randint(0, VOCAB, (3, 7), generator=gen)
    topk = torch.randint(0, VOCAB, (3, 7, 4), generator=gen)
    weights = torch.randn(3, 7, 6, generator=gen)
    ref_in = full.clone().requires_grad_(True)
    ref_lsm = torch.log_softmax(ref_in[..., :VOCAB] / TEMPERATURE, dim=-1)
    ref = [
        ref_lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        -(ref_lsm.exp() * ref_lsm).sum(-1),
        ref_lsm.gather(-1, topk),
    ]
    local = full.chunk(ctx.tensor_model_parallel_size, dim=-1)[ctx.tp_rank].clone().requires_grad_(True)
    lp, ent = logprobs_and_entropy(local, targets, ctx.tp_group, temperature=TEMPERATURE, vocab_size=VOCAB)
    tk = vocab_parallel_topk_logprobs(local, topk, ctx.tp_group, temperature=TEMPERATURE, vocab_size=VOCAB)
    outs = [lp, ent, tk]
    results["vp_value_diff"] = max((o - r).abs().max().item() for o, r in zip(outs, ref))
    combine = lambda xs: (
        (xs[0] * weights[..., 0]).sum() + (xs[1] * weights[..., 1]).sum() + (xs[2] * weights[..., 2:]).sum()
    )
    combine(ref).backward()
    combine(outs).backward()
    ref_grad = ref_in.grad.chunk(ctx.tensor_model_parallel_size, dim=-1)[ctx.tp_rank]
    results["vp_grad_diff"] = (local.grad - ref_grad).abs().max().item()
    first_padded = VOCAB - ctx.tp_rank * local.shape[-1]  # local index of global column VOCAB
    padded_grad = local.grad[..., max(first_padded, 0) :]
    stats = torch.tensor(
        [
            padded_grad.abs().max().item() if padded_grad.numel() else 0.0,
            float(padded_grad.shape[-1]) if first_padded < local.shape[-1] else 0.0,
        ]
    )
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=ctx.tp_group)
    results["vp_grad_padded_cols"], results["vp_num_padded_cols"] = stats.tolist()


def check_chunked_logprobs(trainer, results):
    """Chunked log-probs (output layer per chunk) vs the whole-logits vocab-parallel path at this TP, float64."""
    from rlad_megatron.backends.megatron.logprobs import (
        chunked_logprobs,
        logprobs_and_entropy,
        vocab_parallel_topk_logprobs,
    )

    ctx, dtype = trainer.parallel, torch.float64
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(23, 8, generator=gen, dtype=dtype)
    weight = torch.randn(128, 8, generator=gen, dtype=dtype).chunk(ctx.tensor_model_parallel_size)[ctx.tp_rank]
    targets = torch.randint(0, VOCAB, (23,), generator=gen)
    topk = torch.randint(0, VOCAB, (23, 3), generator=gen)
    mix = torch.randn(23, 4, generator=gen, dtype=dtype)
    sampling = {"temperature": TEMPERATURE, "vocab_size": VOCAB}
    runs = []
    for chunk_size in (0, 5):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        if chunk_size:
            out = chunked_logprobs(
                h, w, targets, ctx.tp_group, chunk_size=chunk_size, topk_ids=topk, with_entropy=True, **sampling
            )
            values = [out["logprobs"], out["entropy"], out["topk_logprobs"]]
        else:
            logits = h @ w.t()
            lp, ent = logprobs_and_entropy(logits, targets, ctx.tp_group, **sampling)
            values = [lp, ent.detach(), vocab_parallel_topk_logprobs(logits, topk, ctx.tp_group, **sampling)]
        ((values[0] * mix[:, 0]).sum() + (values[2] * mix[:, 1:]).sum()).backward()
        runs.append((values, [h.grad, w.grad]))
    (ref_values, ref_grads), (values, grads) = runs
    results["chunked_value_diff"] = max((a - b).abs().max().item() for a, b in zip(values, ref_values))
    results["chunked_grad_diff"] = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads))
    results["chunked_grad_max"] = max(g.abs().max().item() for g in ref_grads)


def hf_to_megatron(hf_model, megatron_model) -> None:
    """Test-only TP=1 weight copy (HF names -> Megatron local-spec names) to compare forwards."""
    cfg, sd = hf_model.config, hf_model.state_dict()
    heads, groups = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    out = {}

    def qkv(prefix, suffix):
        q = sd[f"{prefix}.q_proj.{suffix}"].reshape(groups, heads // groups * dim, -1)
        k = sd[f"{prefix}.k_proj.{suffix}"].reshape(groups, dim, -1)
        v = sd[f"{prefix}.v_proj.{suffix}"].reshape(groups, dim, -1)
        fused = torch.cat([q, k, v], dim=1)
        return fused.reshape(-1, fused.shape[-1]) if suffix == "weight" else fused.reshape(-1)

    for i in range(cfg.num_hidden_layers):
        h, m = f"model.layers.{i}", f"decoder.layers.{i}"
        out[f"{m}.input_layernorm.weight"] = sd[f"{h}.input_layernorm.weight"]
        out[f"{m}.self_attention.linear_qkv.weight"] = qkv(f"{h}.self_attn", "weight")
        if f"{h}.self_attn.q_proj.bias" in sd:
            out[f"{m}.self_attention.linear_qkv.bias"] = qkv(f"{h}.self_attn", "bias")
        for norm in ("q", "k"):
            if f"{h}.self_attn.{norm}_norm.weight" in sd:
                out[f"{m}.self_attention.{norm}_layernorm.weight"] = sd[f"{h}.self_attn.{norm}_norm.weight"]
        out[f"{m}.self_attention.linear_proj.weight"] = sd[f"{h}.self_attn.o_proj.weight"]
        out[f"{m}.pre_mlp_layernorm.weight"] = sd[f"{h}.post_attention_layernorm.weight"]
        out[f"{m}.mlp.linear_fc1.weight"] = torch.cat([sd[f"{h}.mlp.gate_proj.weight"], sd[f"{h}.mlp.up_proj.weight"]])
        out[f"{m}.mlp.linear_fc2.weight"] = sd[f"{h}.mlp.down_proj.weight"]
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    params = dict(megatron_model.named_parameters())
    with torch.no_grad():
        params["embedding.word_embeddings.weight"][: cfg.vocab_size] = sd["model.embed_tokens.weight"]
        if "output_layer.weight" in params:
            params["output_layer.weight"][: cfg.vocab_size] = sd["lm_head.weight"]
        for name, value in out.items():
            params[name].copy_(value)
    missing = set(params) - set(out) - {"embedding.word_embeddings.weight", "output_layer.weight"}
    assert not missing, missing


def check_hf_equivalence(results) -> None:
    """Logits of the Megatron local-spec model vs transformers' own forward, per family (TP=1)."""
    from transformers import AutoModelForCausalLM

    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.tiny_models import FAMILIES, tiny_hf_config

    cfg = make_cfg()
    tokens = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    for family in FAMILIES:
        torch.manual_seed(4)
        # A non-default RoPE theta checks that the base is read from the HF config.
        hf_config = tiny_hf_config(family, rope_theta=50000.0)
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
        model = build_model(hf.config, cfg.model, cfg.parallel)[0].eval()
        hf_to_megatron(hf, model)
        with torch.no_grad():
            ref = hf(tokens).logits
            out = model(tokens, torch.arange(11).expand(2, 11), None)[..., : hf.config.vocab_size]
        results[f"hf_logits_{family}"] = (out - ref).abs().max().item()
        results[f"hf_params_{family}"] = [
            sum(p.numel() for p in hf.parameters()),
            sum(p.numel() for p in model.parameters()),
        ]


class Ctx:
    """What the stages share: inputs, the single-process reference and the measurements."""

    def __init__(self, run_dir: str):
        from rlad_megatron.backends.megatron import checkpoint

        self.ckpt, self.run_dir, self.results = checkpoint, run_dir, {}
        self.samples = make_samples()
        self.adv = inputs(self.samples)
        self.old = self.ref_loss = self.ref_grads = self.ref_lp = None
        self.lp_after = {}

    def path(self, step: int):
        return self.ckpt.checkpoint_root(self.run_dir) / f"step_{step}"

    def parity(self, trainer, key: str) -> None:
        """Loss and every gradient of one step's forward/backward vs the single-process reference."""
        m = trainer.forward_backward(self.samples, self.adv, 0, old_logprobs=self.old)
        self.results[key] = {
            "loss": abs(m["loss"] - self.ref_loss),
            "grad": max_diff(full_tensors(trainer, True), self.ref_grads),
        }


def stage_dp2(c: Ctx) -> None:
    """DP=2: the reference (single-process maths on each rank), the DP-split step, dist-opt step."""
    tr = make_trainer(make_cfg())
    check_hf_equivalence(c.results)
    c.old = old_logprobs_for(tr, c.samples)
    c.ckpt.save_checkpoint(tr, c.run_dir, 0, {"data_position": 0})
    c.ref_loss, c.ref_grads, c.ref_lp = reference_loss_and_grads(tr, c.samples, c.adv, c.old)
    c.results["num_parameters"] = tr.num_parameters()
    c.results["dp_packed_vs_padded_lp"] = lp_diff(tr.compute_logprobs(c.samples), c.ref_lp)
    c.results["ref_loss"] = c.ref_loss
    c.results["ref_grad_max"] = max(g.abs().max().item() for g in c.ref_grads.values())
    c.parity(tr, "dp2")
    before = full_tensors(tr, grads=False)
    tr.train_step(c.samples, c.adv, 0, old_logprobs=c.old)
    plain = full_tensors(tr, grads=False)
    c.results["optimizer_step_size"] = max_diff(plain, before)
    tr = make_trainer(make_cfg(dist_opt=True))  # same step-0 weights, fresh optimizer state
    c.ckpt.load_latest(tr, c.run_dir, load_optimizer=False)
    step0_dir = os.path.join(c.run_dir, "dist_opt_step0")
    c.ckpt.save_checkpoint(tr, step0_dir, 0, {})  # before any update: the optimizer has no state
    tr.train_step(c.samples, c.adv, 0, old_logprobs=c.old)
    stepped = full_tensors(tr, grads=False)
    c.results["dist_opt_step_diff"] = max_diff(stepped, plain)
    # A second, different gradient: stale Adam moments would now change the next update.
    tr.train_step(c.samples, [-a for a in c.adv], 1, old_logprobs=c.old)
    c.ckpt.load_latest(tr, step0_dir)  # into the stepped trainer: step-0 model, fresh optimizer
    c.results["dist_opt_step0_model_diff"] = max_diff(full_tensors(tr, grads=False), before)
    c.results["dist_opt_step0_num_states"] = len(tr.optimizer.optimizer.state)
    tr.train_step(c.samples, c.adv, 0, old_logprobs=c.old)
    c.results["dist_opt_step0_resumed_diff"] = max_diff(full_tensors(tr, grads=False), stepped)


def stage_tp2(c: Ctx) -> None:
    """TP=2: packed log-probs vs the padded TP=1 reference, parity, vocab-parallel maths; save step 1."""
    tr = make_trainer(make_cfg(tp=2))
    c.ckpt.load_latest(tr, c.run_dir)
    c.results["tp2_lp"] = lp_diff(tr.compute_logprobs(c.samples), c.ref_lp)
    c.parity(tr, "tp2")
    check_vocab_parallel(tr, c.results)
    check_chunked_logprobs(tr, c.results)
    tr.train_step(c.samples, c.adv, 0, old_logprobs=c.old)
    c.lp_after["tp2"] = tr.compute_logprobs(c.samples)
    c.ckpt.save_checkpoint(tr, c.run_dir, 1, {"data_position": 1})
    tr = make_trainer(make_cfg(tp=2, sp=True))
    c.ckpt.load_checkpoint(tr, c.path(0))
    c.parity(tr, "tp2_sp")


def stage_pp2(c: Ctx) -> None:
    """PP=2: parity from step 0; the TP=2 checkpoint resharded to PP=2; save step 2."""
    tr = make_trainer(make_cfg(pp=2))
    c.ckpt.load_checkpoint(tr, c.path(0))
    c.parity(tr, "pp2")
    c.ckpt.load_latest(tr, c.run_dir)
    c.results["tp2_to_pp2_lp"] = lp_diff(tr.compute_logprobs(c.samples), c.lp_after["tp2"])
    tr.train_step(c.samples, c.adv, 1, old_logprobs=c.old)
    c.lp_after["pp2"] = tr.compute_logprobs(c.samples)
    c.ckpt.save_checkpoint(tr, c.run_dir, 2, {"data_position": 2})


def stage_tp1_reload(c: Ctx):
    """TP=1, PP=1 (DP=2): load the TP=2 and the PP=2 checkpoints."""
    tr = make_trainer(make_cfg())
    c.ckpt.load_checkpoint(tr, c.path(1))
    c.results["tp2_to_tp1_lp"] = lp_diff(tr.compute_logprobs(c.samples), c.lp_after["tp2"])
    step, extra = c.ckpt.load_latest(tr, c.run_dir)
    c.results["pp2_to_pp1_lp"] = lp_diff(tr.compute_logprobs(c.samples), c.lp_after["pp2"])
    c.results["latest_step"], c.results["latest_extra"] = step, extra
    return tr


def stage_crash_and_nan(c: Ctx, tr) -> None:
    """Interrupted save (every rank dies after writing step_3.tmp, before the rename); NaN loss."""
    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def crashing_save(*args, **kwargs):
        real_save(*args, **kwargs)
        raise RuntimeError("simulated crash after writing, before the rename")

    dist_checkpointing.save = crashing_save
    try:
        c.ckpt.save_checkpoint(tr, c.run_dir, 3, {"data_position": 3})
        c.results["crash_raised"] = False
    except RuntimeError:
        c.results["crash_raised"] = True
    finally:
        dist_checkpointing.save = real_save
    dist.barrier()
    root = c.ckpt.checkpoint_root(c.run_dir)
    c.results["after_crash_latest"] = c.ckpt.latest_checkpoint(c.run_dir).name
    c.results["after_crash_tmp_exists"] = (root / "step_3.tmp").exists()
    c.results["after_crash_load_step"] = c.ckpt.load_latest(tr, c.run_dir)[0]
    c.ckpt.save_checkpoint(tr, c.run_dir, 4, {"data_position": 4}, keep_last=2)
    c.results["after_prune"] = sorted(p.name for p in root.iterdir())
    before = full_tensors(tr, grads=False)
    m = tr.train_step(c.samples, [float("nan"), *c.adv[1:]], 5, old_logprobs=c.old)
    c.results["nan_skipped"] = m["skipped"]
    c.results["nan_param_change"] = max_diff(full_tensors(tr, grads=False), before)


def main(out_path: str) -> None:
    holder = [tempfile.mkdtemp(prefix="mt_ckpt_") if int(os.environ["RANK"]) == 0 else None]
    from rlad_megatron.backends.megatron.parallel import init_parallel

    init_parallel(make_cfg().parallel, 0)  # torch.distributed up, so rank 0 can share its folder
    dist.broadcast_object_list(holder, src=0)
    c = Ctx(holder[0])
    stage_dp2(c)
    stage_tp2(c)
    stage_pp2(c)
    stage_crash_and_nan(c, stage_tp1_reload(c))
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(c.results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
