"""Advantages, the clipped policy loss and TRRD: hand-computed cases, a per-token loop reference
on random tensors (values and gradients), and the identities of docs/algorithms.md sections 1-3."""

import math

import pytest
import torch

from rlad_megatron.algorithms import (
    aggregate,
    group_advantages,
    policy_loss,
    seq_weights_from_lengths,
    seq_weights_from_mask,
    trrd_loss,
    zero_advantage_groups,
)

CL, CH = 0.2, 0.28


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- advantages
def test_group_advantages_hand_case():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, scale="std", eps=0.0)
    sigma = math.sqrt((0.75**2 + 3 * 0.25**2) / 4)  # population std of [1, 0, 0, 0]
    expected = [0.75 / sigma, -0.25 / sigma, -0.25 / sigma, -0.25 / sigma, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    plain = group_advantages(rewards, 4, scale="none")
    assert torch.allclose(plain, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))


def test_group_advantages_identical_rewards_are_exactly_zero():
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3, 0.3])
    adv = group_advantages(rewards, 3, eps=1e-6)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3:].abs().sum() > 0


def test_zero_advantage_groups_mask_and_fraction():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    mask, frac = zero_advantage_groups(rewards, 2)
    assert mask.tolist() == [True, False, True, True]
    assert frac.item() == pytest.approx(0.75)


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="group_size=4"):
        group_advantages(torch.ones(6), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 4, scale="max")


# ---------------------------------------------------------------- aggregation
def test_aggregate_hand_case_and_seq_weights():
    values = t64([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert aggregate(values, mask, aggregation="token_mean", num_tokens=4).item() == pytest.approx(10 / 4)
    # per-response means 2 and 4, over 2 responses
    assert aggregate(values, mask, aggregation="seq_mean_token_mean", num_seqs=2).item() == pytest.approx(3.0)
    packed = seq_weights_from_lengths([3, 1])
    assert torch.allclose(packed, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    assert torch.allclose(seq_weights_from_mask(mask)[0], torch.full((3,), 1 / 3))
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate(values, mask, aggregation="token_mean")
    with pytest.raises(ValueError, match="token_sum"):
        aggregate(values, mask, aggregation="token_sum", num_tokens=1)


# ---------------------------------------------------------------- policy loss, hand case
def test_policy_loss_hand_case():
    lp = leaf([[0.0, math.log(1.5), math.log(0.5)]])
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = t64([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = policy_loss(lp, old, adv, mask, clip_low=CL, clip_high=CH, aggregation="token_mean", num_tokens=3)
    # token 0: r=1 -> -1; token 1: r=1.5 clipped to 1.28 -> -1.28; token 2: r=0.5, A<0, clip 0.8 -> +0.8
    assert loss.item() == pytest.approx((-1 - 1.28 + 0.8) / 3)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 3)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert all(not v.requires_grad for v in m.values())
    loss.backward()
    assert torch.allclose(lp.grad, t64([[-1 / 3, 0.0, 0.0]]))


def test_policy_loss_reference_kl_hand_case():
    lp = leaf([[-1.0, -2.0]])
    ref = t64([[-1.5, -2.0]])
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    kw = {
        "clip_low": CL,
        "clip_high": CH,
        "aggregation": "token_mean",
        "num_tokens": 2,
        "ref_logprobs": ref,
        "ref_kl_coef": 0.1,
    }
    loss, m = policy_loss(lp, lp.detach(), zeros, mask, ref_kl_estimator="k3", **kw)
    k3 = math.exp(-0.5) + 0.5 - 1  # R = lp_ref - lp = -0.5 on token 0, 0 on token 1
    assert loss.item() == pytest.approx(0.1 * k3 / 2)
    assert m["ref_kl"].item() == pytest.approx(k3 / 2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp.detach(), zeros, mask, **{**kw, "ref_logprobs": None})


# ---------------------------------------------------------------- TRRD, hand case
TRRD_CASE = {
    "lp": [[-1.0, -1.0, -1.0, -1.0]],
    "teacher": [[-0.5, -4.0, -1.2, -4.0]],
    "adv": [[1.0, 1.0, -1.0, -1.0]],
}


def _trrd_hand(clamp_mode):
    lp = leaf(TRRD_CASE["lp"])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = trrd_loss(
        lp,
        lp.detach().clone(),
        t64(TRRD_CASE["teacher"]),
        t64(TRRD_CASE["adv"]),
        mask,
        alpha=0.5,
        clip_low=CL,
        clip_high=CH,
        teacher_log_ratio_clamp=1.0,
        clamp_mode=clamp_mode,
        aggregation="token_mean",
        num_tokens=4,
    )
    loss.backward()
    return loss, m, lp.grad


def test_trrd_hand_case_values_and_metrics():
    loss, m, grad = _trrd_hand("detached")
    # log r = 0.5 * clamp(lp - lp_T, -1, 1) at the first step (lp == lp_old)
    r = [math.exp(-0.25), math.exp(0.5), math.exp(0.1), math.exp(0.5)]
    per_token = [-r[0], -(1 + CH), r[2], r[3]]  # token 1 clipped high; token 3 (A<0, r>1) unclipped
    assert loss.item() == pytest.approx(sum(per_token) / 4)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert m["clip_frac_low"].item() == 0.0
    assert m["clamp_active_frac"].item() == pytest.approx(2 / 4)
    assert m["teacher_log_ratio_mean"].item() == pytest.approx((-0.5 + 3.0 + 0.2 + 3.0) / 4)
    # GRPO at lp == lp_old has r = 1 everywhere: nothing clipped; TRRD clips token 1 only
    assert m["clip_differs_from_grpo_frac"].item() == pytest.approx(1 / 4)
    # shift s = 0.5 * (teacher anchor - lp_old) = +0.25, -0.5, -0.1, -0.5: all above 0.05 nats, all A != 0
    assert m["bound_moved_frac"].item() == pytest.approx(4 / 4)
    assert m["ratio_mean"].item() == pytest.approx(sum(r) / 4)
    # detached clamp: grad = -A * r / N wherever the PPO clip is inactive
    assert torch.allclose(grad, t64([[-r[0] / 4, 0.0, r[2] / 4, r[3] / 4]]))


def test_trrd_trust_region_metrics_ignore_tiny_teacher_differences():
    """A teacher that differs from the student by rounding-size amounts moves no bound and changes no clip
    state, even though every token has a non-zero advantage."""
    lp = t64([[-1.0, -1.0, -1.0, -1.0]])
    teacher = lp + t64([[1e-6, -1e-6, 0.04, -0.04]])  # |s| = 0.5 * |lp - lp_T| <= 0.02 < 0.05
    adv = t64([[1.0, -1.0, 1.0, -1.0]])
    kw = {"clip_low": CL, "clip_high": CH, "teacher_log_ratio_clamp": 1.0, "aggregation": "token_mean"}
    _, m = trrd_loss(lp, lp, teacher, adv, torch.ones(1, 4, dtype=torch.bool), alpha=0.5, num_tokens=4, **kw)
    assert m["bound_moved_frac"].item() == 0.0
    assert m["clip_differs_from_grpo_frac"].item() == 0.0


def test_trrd_clip_state_differs_from_grpo_in_both_directions():
    """TRRD log r = lp - (0.5 lp_old + 0.5 lp_T), GRPO log r = lp - lp_old, on the same lp.
    token 0 (A > 0): GRPO 0.3 (e^0.3 > 1.28, clipped high); the teacher likes it (lp_T = lp_old + 0.4), TRRD
        0.1: not clipped.
    token 1 (A > 0): teacher = old student: both 0.3, both clipped high.
    token 2 (A < 0): GRPO -0.1 (0.905 > 0.8, not clipped); the teacher likes it (lp_T = lp_old + 0.5), TRRD
        -0.35 (0.70 < 0.8): clipped low.
    token 3 (A < 0): teacher = old student: both -0.1, neither clipped."""
    old = t64([[-2.0, -2.0, -2.0, -2.0]])
    lp = old + t64([[0.3, 0.3, -0.1, -0.1]])
    teacher = old + t64([[0.4, 0.0, 0.5, 0.0]])
    adv = t64([[1.0, 1.0, -1.0, -1.0]])
    kw = {"clip_low": CL, "clip_high": CH, "teacher_log_ratio_clamp": 0.0, "aggregation": "token_mean"}
    _, m = trrd_loss(lp, old, teacher, adv, torch.ones(1, 4, dtype=torch.bool), alpha=0.5, num_tokens=4, **kw)
    assert m["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 4)
    assert m["clip_differs_from_grpo_frac"].item() == pytest.approx(2 / 4)
    # bounds moved by |s| = 0.2, 0, 0.25, 0 nats
    assert m["bound_moved_frac"].item() == pytest.approx(2 / 4)


def test_trrd_live_clamp_cuts_teacher_gradient_where_clamped():
    loss_d, _, grad_d = _trrd_hand("detached")
    loss_l, _, grad_l = _trrd_hand("live")
    assert loss_l.item() == pytest.approx(loss_d.item())  # same value, different gradient
    r3 = math.exp(0.5)
    assert grad_l[0, 3].item() == pytest.approx(0.5 * r3 / 4)  # only the alpha part survives the clamp
    assert grad_l[0, 0].item() == pytest.approx(grad_d[0, 0].item())


# ---------------------------------------------------------------- per-token loop reference
def reference_loss_and_grad(lp, old, teacher, adv, mask, *, alpha, c, clamp_mode, aggregation):
    """Slow, obvious: Python floats, one token at a time; the gradient from the chain rule by hand."""
    rows, cols = len(lp), len(lp[0])
    num_tokens = sum(sum(row) for row in mask)
    num_seqs = sum(1 for row in mask if sum(row) > 0)
    total, grad = 0.0, [[0.0] * cols for _ in range(rows)]
    for b in range(rows):
        length = sum(mask[b])
        for t in range(cols):
            if not mask[b][t]:
                continue
            d = lp[b][t] - teacher[b][t]
            d_used = max(-c, min(c, d)) if c > 0 else d
            log_r = alpha * (lp[b][t] - old[b][t]) + (1 - alpha) * d_used
            r, a = math.exp(log_r), adv[b][t]
            clipped = max(1 - CL, min(1 + CH, r))
            weight = 1 / num_tokens if aggregation == "token_mean" else 1 / (length * num_seqs)
            total += -min(r * a, clipped * a) * weight
            active = r * a <= clipped * a  # the unclipped branch is the min: gradient flows
            dlogr = 1.0
            if clamp_mode == "live" and c > 0 and abs(d) > c:
                dlogr = alpha
            grad[b][t] = -a * r * dlogr * weight if active else 0.0
    return total, grad


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("clamp_mode", ["detached", "live"])
def test_trrd_matches_loop_reference_on_random_tensors(aggregation, clamp_mode):
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        shape = (3, 6)
        lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
        old = lp + 0.4 * torch.randn(shape, generator=g, dtype=torch.float64)
        teacher = lp + 1.5 * torch.randn(shape, generator=g, dtype=torch.float64)
        adv = torch.randn(shape, generator=g, dtype=torch.float64)
        adv[0, :2] = 0.0
        mask = torch.rand(shape, generator=g) < 0.7
        mask[:, 0] = True
        alpha = [0.0, 0.3, 0.5, 1.0][seed % 4]
        c = [1.0, 0.0, 0.5][seed % 3]
        x = lp.clone().requires_grad_(True)
        loss, _ = trrd_loss(
            x,
            old,
            teacher,
            adv,
            mask,
            alpha=alpha,
            clip_low=CL,
            clip_high=CH,
            teacher_log_ratio_clamp=c,
            clamp_mode=clamp_mode,
            aggregation=aggregation,
            num_tokens=int(mask.sum()),
            num_seqs=3,
        )
        loss.backward()
        ref_value, ref_grad = reference_loss_and_grad(
            lp.tolist(),
            old.tolist(),
            teacher.tolist(),
            adv.tolist(),
            mask.tolist(),
            alpha=alpha,
            c=c,
            clamp_mode=clamp_mode,
            aggregation=aggregation,
        )
        assert loss.item() == pytest.approx(ref_value, rel=1e-10, abs=1e-12), seed
        assert torch.allclose(x.grad, t64(ref_grad), rtol=1e-9, atol=1e-12), seed


# ---------------------------------------------------------------- identities
def _random(seed, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 2
    return (
        lp,
        lp + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64),
        lp + 2.0 * torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.rand(shape, generator=g) < 0.8,
    )


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("clamp_mode", ["detached", "live"])
def test_trrd_alpha_one_is_exactly_grpo(aggregation, clamp_mode):
    for seed in range(10):
        lp, old, teacher, adv, mask = _random(seed)
        kw = {"clip_low": CL, "clip_high": CH, "aggregation": aggregation, "num_tokens": int(mask.sum()), "num_seqs": 4}
        a, b = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
        loss_t, m_t = trrd_loss(
            a, old, teacher, adv, mask, alpha=1.0, teacher_log_ratio_clamp=1.0, clamp_mode=clamp_mode, **kw
        )
        loss_p, m_p = policy_loss(b, old, adv, mask, **kw)
        loss_t.backward()
        loss_p.backward()
        assert torch.equal(loss_t, loss_p)
        assert torch.equal(a.grad, b.grad)
        for key in ("clip_frac_high", "clip_frac_low", "ratio_mean"):
            assert torch.equal(m_t[key], m_p[key])
        assert m_t["clip_differs_from_grpo_frac"].item() == 0.0 and m_t["bound_moved_frac"].item() == 0.0


def test_trrd_first_step_with_teacher_equal_student_has_unit_ratio():
    lp, _, _, adv, mask = _random(3)
    x = lp.clone().requires_grad_(True)
    loss, m = trrd_loss(
        x,
        lp,
        lp,
        adv,
        mask,
        alpha=0.5,
        clip_low=CL,
        clip_high=CH,
        teacher_log_ratio_clamp=1.0,
        aggregation="token_mean",
        num_tokens=int(mask.sum()),
    )
    loss.backward()
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    for key in (
        "clip_frac_high",
        "clip_frac_low",
        "clamp_active_frac",
        "clip_differs_from_grpo_frac",
        "bound_moved_frac",
    ):
        assert m[key].item() == 0.0, key
    # ratio 1 everywhere: the plain policy gradient -A / N
    assert torch.allclose(x.grad, -adv * mask / mask.sum())


@pytest.mark.parametrize("clamp_mode", ["detached", "live"])
def test_trrd_zero_advantage_gives_zero_gradient_whatever_the_teacher(clamp_mode):
    for seed in range(5):
        lp, old, teacher, _, mask = _random(seed)
        x = lp.clone().requires_grad_(True)
        loss, m = trrd_loss(
            x,
            old,
            teacher * 3 - 5,
            torch.zeros_like(lp),
            mask,
            alpha=0.2,
            clip_low=CL,
            clip_high=CH,
            teacher_log_ratio_clamp=0.0,
            clamp_mode=clamp_mode,
            aggregation="token_mean",
            num_tokens=int(mask.sum()),
        )
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(x.grad, torch.zeros_like(lp))
        assert m["clip_differs_from_grpo_frac"].item() == 0.0 and m["bound_moved_frac"].item() == 0.0


def test_trrd_detached_gradient_is_ratio_times_advantage_where_unclipped():
    for seed in range(10):
        lp, old, teacher, adv, mask = _random(seed)
        x = lp.clone().requires_grad_(True)
        n = int(mask.sum())
        loss, _ = trrd_loss(
            x,
            old,
            teacher,
            adv,
            mask,
            alpha=0.5,
            clip_low=CL,
            clip_high=CH,
            teacher_log_ratio_clamp=1.0,
            clamp_mode="detached",
            aggregation="token_mean",
            num_tokens=n,
        )
        loss.backward()
        d = torch.clamp(lp - teacher, -1.0, 1.0)
        r = torch.exp(0.5 * (lp - old) + 0.5 * d)
        unclipped = ~(((adv > 0) & (r > 1 + CH)) | ((adv < 0) & (r < 1 - CL))) & mask
        assert torch.allclose(x.grad[unclipped], (-r * adv / n)[unclipped])
        assert torch.equal(x.grad[~unclipped], torch.zeros_like(x.grad[~unclipped]))
        assert unclipped.any() and (mask & ~unclipped).any(), "the seed should exercise both branches"


def test_trrd_teacher_mask_falls_back_to_grpo_on_dropped_tokens():
    lp, old, teacher, adv, mask = _random(7)
    mask[:] = True
    teacher_mask = torch.ones_like(mask)
    teacher_mask[:, -1] = False  # e.g. the final EOS of every response
    kw = {"clip_low": CL, "clip_high": CH, "aggregation": "token_mean", "num_tokens": mask.numel()}
    a, b = lp.clone().requires_grad_(True), lp.clone().requires_grad_(True)
    trrd_loss(a, old, teacher, adv, mask, alpha=0.5, teacher_log_ratio_clamp=1.0, teacher_mask=teacher_mask, **kw)[
        0
    ].backward()
    policy_loss(b, old, adv, mask, **kw)[0].backward()
    assert torch.equal(a.grad[:, -1], b.grad[:, -1])
    assert not torch.allclose(a.grad[:, :-1], b.grad[:, :-1])
