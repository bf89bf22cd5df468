"""Split and layout invariance of every objective's loss.

The same responses are laid out padded ([B, S], one response per row) or packed ([1, T],
responses end to end with prompt tokens in between, as the Megatron backend does), and the
step is computed as 1 micro-batch or 3. With the global token / response counts passed in,
the summed loss shares, the gradients on the per-response leaves and the summed metric
shares must agree across all four ways."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlad_megatron.algorithms import build_objective, seq_weights_from_lengths
from rlad_megatron.config import AlgorithmConfig

K = 3
PER_TOKEN = ("old_logprobs", "teacher_logprobs", "ref_logprobs", "advantages", "rewards")


def make_responses(seed, num=6):
    g = torch.Generator().manual_seed(seed)
    responses = []
    for i in range(num):
        n = int(torch.randint(1, 8, (1,), generator=g))
        lp = -torch.rand(n, generator=g, dtype=torch.float64) * 2
        reward = float(i % 2)  # odd responses "correct" (reward 1)
        responses.append(
            {
                "prompt_len": int(torch.randint(1, 4, (1,), generator=g)),
                "logprobs": lp.clone().requires_grad_(True),
                "student_topk_logprobs": (-torch.rand(n, K, generator=g, dtype=torch.float64) * 3).requires_grad_(True),
                "teacher_topk_logprobs": -torch.rand(n, K, generator=g, dtype=torch.float64) * 3,
                "old_logprobs": lp + 0.4 * torch.randn(n, generator=g, dtype=torch.float64),
                "teacher_logprobs": lp + 1.5 * torch.randn(n, generator=g, dtype=torch.float64),
                "ref_logprobs": lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64),
                "advantages": torch.randn(n, generator=g, dtype=torch.float64),
                "rewards": torch.full((n,), reward, dtype=torch.float64),
                "teacher_mask": torch.arange(n) < n - (i % 3 == 0),  # drop the "final EOS" of some
            }
        )
    return responses


def _row(resp, key, tail=()):
    """One response's segment: zeros over its prompt, then its values."""
    value = resp[key]
    return torch.cat([torch.zeros((resp["prompt_len"], *tail), dtype=value.dtype), value])


def _segment(resp):
    n = resp["logprobs"].numel()
    seg = {key: _row(resp, key) for key in ("logprobs", *PER_TOKEN, "teacher_mask")}
    seg.update({key: _row(resp, key, (K,)) for key in ("student_topk_logprobs", "teacher_topk_logprobs")})
    seg["mask"] = torch.cat([torch.zeros(resp["prompt_len"], dtype=torch.bool), torch.ones(n, dtype=torch.bool)])
    seg["seq_weights"] = _row({**resp, "w": seq_weights_from_lengths([n], torch.float64)}, "w")
    return seg


def _pad_to(t, length):
    pad = torch.zeros((length - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


def padded(responses):
    segs = [_segment(r) for r in responses]
    width = max(s["mask"].numel() for s in segs) + 1
    return {k: torch.stack([_pad_to(s[k], width) for s in segs]) for k in segs[0]}


def packed(responses):
    segs = [_segment(r) for r in responses]
    return {
        k: _pad_to(torch.cat([s[k] for s in segs]), sum(s["mask"].numel() for s in segs) + 2)[None] for k in segs[0]
    }


CONFIGS = {
    "grpo": {"ref_kl_coef": 0.05},
    "rlad": {"ref_kl_coef": 0.05},
    "rlad_live": {"name": "rlad", "clamp_mode": "live"},
    "kdrl": {"kd_reward_mask": True, "kd_coef": 0.3},
    "kdrl_k3": {"name": "kdrl", "kd_estimator": "k3", "kd_schedule": "annealed"},
    "opd": {},
    "gkd": {"gkd_top_k": K},
    "gkd_rkl": {"name": "gkd", "gkd_top_k": K, "gkd_divergence": "reverse_kl"},
    "sft": {},
}


def run_step(objective, responses, layout, num_micro):
    for r in responses:
        r["logprobs"].grad = None
        r["student_topk_logprobs"].grad = None
    num_tokens = sum(r["logprobs"].numel() for r in responses)
    chunks = [responses[i::num_micro] for i in range(num_micro)]
    total, metrics = 0.0, {}
    for chunk in chunks:
        batch = layout(chunk)
        loss, m = objective.loss(batch, num_tokens=num_tokens, num_seqs=len(responses), step=7)
        loss.backward()
        total = total + loss.detach()
        for k, v in m.items():
            metrics[k] = metrics.get(k, 0.0) + v
    grads = [
        torch.cat(
            [
                r["logprobs"].grad if r["logprobs"].grad is not None else torch.zeros_like(r["logprobs"]),
                (
                    r["student_topk_logprobs"].grad
                    if r["student_topk_logprobs"].grad is not None
                    else torch.zeros_like(r["student_topk_logprobs"])
                ).flatten(),
            ]
        )
        for r in responses
    ]
    return total, torch.cat(grads), metrics


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_loss_grad_and_metrics_do_not_depend_on_split_or_layout(case, aggregation):
    fields = {"name": case, **CONFIGS[case], "aggregation": aggregation}
    objective = build_objective(AlgorithmConfig(**fields))
    for seed in range(3):
        responses = make_responses(seed)
        ref_loss, ref_grad, ref_metrics = run_step(objective, responses, padded, 1)
        assert ref_grad.abs().sum() > 0, "the step must produce a gradient"
        for layout in (padded, packed):
            for num_micro in (1, 3):
                loss, grad, metrics = run_step(objective, responses, layout, num_micro)
                where = f"{case} {aggregation} {layout.__name__} x{num_micro} seed {seed}"
                assert torch.allclose(loss, ref_loss, rtol=1e-12, atol=1e-14), where
                assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14), where
                assert metrics.keys() == ref_metrics.keys(), where
                for key in metrics:
                    assert torch.allclose(metrics[key].double(), ref_metrics[key].double(), atol=1e-6), (where, key)


def test_padded_seq_mean_without_seq_weights_matches_explicit_weights():
    """For padded rows the weights can be derived from the mask; the result must not change."""
    responses = make_responses(11)
    batch = padded(responses)
    objective = build_objective(AlgorithmConfig(name="grpo", aggregation="seq_mean_token_mean"))
    from rlad_megatron.algorithms import policy_loss

    explicit, _ = objective.loss(batch, num_tokens=1, num_seqs=6)
    derived, _ = policy_loss(
        batch["logprobs"],
        batch["old_logprobs"],
        batch["advantages"],
        batch["mask"],
        clip_low=0.2,
        clip_high=0.28,
        aggregation="seq_mean_token_mean",
        num_tokens=1,
        num_seqs=6,
    )
    assert torch.allclose(explicit, derived, rtol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    chunk_ids=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    aggregation=st.sampled_from(["token_mean", "seq_mean_token_mean"]),
    seed=st.integers(0, 1000),
)
def test_any_partition_into_micro_batches_gives_the_same_step(chunk_ids, aggregation, seed):
    """Arbitrary (non-contiguous, uneven, packed) micro-batch assignments of the same step agree."""
    objective = build_objective(AlgorithmConfig(name="rlad", aggregation=aggregation, ref_kl_coef=0.05))
    responses = make_responses(seed)
    ref_loss, ref_grad, _ = run_step(objective, responses, padded, 1)
    for r in responses:
        r["logprobs"].grad = None
    total = 0.0
    for chunk in sorted(set(chunk_ids)):
        part = [r for r, c in zip(responses, chunk_ids) if c == chunk]
        loss, _ = objective.loss(
            packed(part), num_tokens=sum(r["logprobs"].numel() for r in responses), num_seqs=len(responses)
        )
        loss.backward()
        total = total + loss.detach()
    grad = torch.cat(
        [r["logprobs"].grad if r["logprobs"].grad is not None else torch.zeros_like(r["logprobs"]) for r in responses]
    )
    assert torch.allclose(total, ref_loss, rtol=1e-12, atol=1e-14)
    assert torch.allclose(grad, _logprob_grads(ref_grad, responses), rtol=1e-10, atol=1e-14)


def _logprob_grads(full_grad, responses):
    """The logprobs part of run_step's concatenated [logprobs grad, top-k grad] per response."""
    parts, offset = [], 0
    for r in responses:
        n = r["logprobs"].numel()
        parts.append(full_grad[offset : offset + n])
        offset += n + r["student_topk_logprobs"].numel()
    return torch.cat(parts)
