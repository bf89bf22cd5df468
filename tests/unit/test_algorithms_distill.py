"""KL estimators and KDRL, on-policy distillation, GKD top-k divergences and SFT (docs/algorithms.md sections 4-5)."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlad_megatron.algorithms import (
    gkd_loss,
    incorrect_mask,
    kd_advantage_term,
    kd_coef_at,
    kd_loss,
    kl_estimator,
    opd_advantage_term,
    sft_loss,
    topk_divergence,
)
from rlad_megatron.config import AlgorithmConfig


def t64(values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_hand_values():
    lp, target = t64([-1.0, -2.0]), t64([-2.0, -2.0])  # R = lp_T - lp = -1, 0
    assert torch.allclose(kl_estimator(lp, target, "k1"), t64([1.0, 0.0]))
    assert torch.allclose(kl_estimator(lp, target, "k2"), t64([0.5, 0.0]))
    assert torch.allclose(kl_estimator(lp, target, "k3"), t64([math.exp(-1) + 1 - 1, 0.0]))
    with pytest.raises(ValueError, match="k4"):
        kl_estimator(lp, target, "k4")


def test_k1_k3_are_unbiased_estimates_of_the_true_kl():
    """Sampling y ~ pi on a small vocabulary: E[k1] = E[k3] = KL(pi || pi_T)."""
    g = torch.Generator().manual_seed(0)
    log_pi = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    log_teacher = torch.log_softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    true_kl = (log_pi.exp() * (log_pi - log_teacher)).sum()
    expect = {kind: (log_pi.exp() * kl_estimator(log_pi, log_teacher, kind)).sum() for kind in ("k1", "k3")}
    assert torch.allclose(expect["k1"], true_kl) and torch.allclose(expect["k3"], true_kl)


def test_k2_gradient_is_the_on_policy_reverse_kl_score_function_form():
    """d/d lp of beta * 0.5 (lp_T - lp)^2 summed / N equals beta * (lp - lp_T) / N per token."""
    g = torch.Generator().manual_seed(1)
    lp = (-torch.rand(2, 5, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = -torch.rand(2, 5, generator=g, dtype=torch.float64) * 3
    mask = torch.rand(2, 5, generator=g) < 0.7
    n = int(mask.sum())
    loss, metrics = kd_loss(lp, teacher, mask, kind="k2", coef=0.1, aggregation="token_mean", num_tokens=n)
    loss.backward()
    assert torch.allclose(lp.grad, 0.1 * (lp.detach() - teacher) * mask / n)
    assert metrics["kd_kl"].item() == pytest.approx((0.5 * (teacher - lp.detach()) ** 2 * mask).sum().item() / n)
    # and the full-vocabulary check: E_{y~pi}[(log pi - log pi_T) d log pi] is the gradient of KL(pi || pi_T)
    logits = torch.randn(6, generator=g, dtype=torch.float64).requires_grad_(True)
    log_teacher = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    log_pi = torch.log_softmax(logits, 0)
    (log_pi.exp() * (log_pi - log_teacher)).sum().backward()
    exact = logits.grad.clone()
    logits.grad = None
    log_pi = torch.log_softmax(logits, 0)
    probs = log_pi.exp().detach()  # expectation over y ~ pi, no gradient through the sampling
    (probs * kl_estimator(log_pi, log_teacher, "k2")).sum().backward()
    assert torch.allclose(logits.grad, exact)


def test_k3_loss_gradient_hand_case():
    lp = t64([[-1.0]]).requires_grad_(True)
    loss, _ = kd_loss(
        lp,
        t64([[-2.0]]),
        torch.ones(1, 1, dtype=torch.bool),
        kind="k3",
        coef=1.0,
        aggregation="token_mean",
        num_tokens=1,
    )
    loss.backward()
    # k3 = exp(R) - R - 1 with R = lp_T - lp: d/d lp = -exp(R) + 1
    assert loss.item() == pytest.approx(math.exp(-1))
    assert lp.grad.item() == pytest.approx(1 - math.exp(-1))
    with pytest.raises(ValueError, match="k1 is an advantage term"):
        kd_loss(
            lp,
            lp.detach(),
            torch.ones(1, 1, dtype=torch.bool),
            kind="k1",
            coef=1.0,
            aggregation="token_mean",
            num_tokens=1,
        )


def test_kd_reward_mask_removes_correct_responses_but_keeps_denominators():
    lp = t64([[-1.0, -1.0], [-1.0, -1.0]]).requires_grad_(True)
    teacher = t64([[-2.0, -2.0], [-3.0, -3.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    rewards = t64([[1.0, 1.0], [0.0, 0.0]])  # row 0 correct, row 1 wrong
    correct = ~incorrect_mask(rewards, 1.0)
    loss, metrics = kd_loss(
        lp, teacher, mask, kind="k2", coef=1.0, aggregation="token_mean", num_tokens=4, correct=correct
    )
    assert loss.item() == pytest.approx(2 * 0.5 * 4 / 4)  # only row 1: R = -2, k2 = 2 per token
    assert metrics["kd_masked_frac"].item() == pytest.approx(0.5)
    loss.backward()
    assert torch.equal(lp.grad[0], torch.zeros(2))


def test_kd_schedules():
    annealed = AlgorithmConfig(name="kdrl", kd_schedule="annealed")
    assert kd_coef_at(0, annealed) == pytest.approx(5e-3)
    assert kd_coef_at(40, annealed) == pytest.approx(3e-3)
    assert kd_coef_at(80, annealed) == pytest.approx(1e-3)
    assert kd_coef_at(1000, annealed) == pytest.approx(1e-3)
    constant = AlgorithmConfig(name="kdrl")
    assert kd_coef_at(0, constant) == kd_coef_at(1000, constant) == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="kd_schedule"):
        kd_coef_at(0, SimpleNamespace(kd_schedule="cosine"))


def test_advantage_terms():
    old, teacher = t64([-1.0, -2.0]), t64([-1.5, -1.0])
    assert torch.allclose(kd_advantage_term(old, teacher, 0.1), t64([-0.05, 0.1]))
    assert torch.allclose(opd_advantage_term(old, teacher, 2.0), t64([-1.0, 2.0]))


# ---------------------------------------------------------------- GKD
def _direct(p, q, kind, beta=0.5):
    """Direct computation on renormalised probability lists (no logs of zero here)."""
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def test_gkd_hand_case_renormalises_over_top_k():
    teacher = torch.log(t64([[[0.6, 0.2]]]))  # renormalised: 0.75, 0.25
    student = torch.log(t64([[[0.1, 0.1]]]))  # renormalised: 0.5, 0.5
    fwd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert topk_divergence(student, teacher, divergence="forward_kl").item() == pytest.approx(fwd)
    assert topk_divergence(student, teacher, divergence="reverse_kl").item() == pytest.approx(rev)
    m = [0.625, 0.375]
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])
    )
    assert topk_divergence(student, teacher, divergence="jsd", jsd_beta=0.5).item() == pytest.approx(jsd)


@pytest.mark.parametrize(
    "kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]
)
def test_gkd_matches_direct_computation_on_random_tensors(kind, beta):
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        student = -torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 4
        teacher = -torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 4
        got = topk_divergence(student, teacher, divergence=kind, jsd_beta=beta)
        for i in range(3):
            for j in range(4):
                want = _direct(teacher[i, j].exp().tolist(), student[i, j].exp().tolist(), kind, beta)
                assert got[i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_gkd_jsd_endpoints_and_limits():
    g = torch.Generator().manual_seed(5)
    student = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    teacher = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 3
    fwd = topk_divergence(student, teacher, divergence="forward_kl")
    rev = topk_divergence(student, teacher, divergence="reverse_kl")
    assert torch.equal(topk_divergence(student, teacher, divergence="jsd", jsd_beta=0.0), fwd)
    assert torch.equal(topk_divergence(student, teacher, divergence="jsd", jsd_beta=1.0), rev)
    # the endpoints are the limits of the scaled divergence, so the convention is continuous
    eps = 1e-5
    near0 = topk_divergence(student, teacher, divergence="jsd", jsd_beta=eps) / eps
    near1 = topk_divergence(student, teacher, divergence="jsd", jsd_beta=1 - eps) / eps
    assert torch.allclose(near0, fwd, rtol=1e-3) and torch.allclose(near1, rev, rtol=1e-3)


def test_gkd_loss_gradient_and_teacher_minus_inf():
    student = torch.log(t64([[[0.2, 0.3, 0.1]]])).requires_grad_(True)
    teacher = t64([[[math.log(0.5), math.log(0.5), -math.inf]]])  # teacher sends -inf for one id
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, metrics = gkd_loss(student, teacher, mask, divergence="forward_kl", aggregation="token_mean", num_tokens=1)
    q = [0.2 / 0.6, 0.3 / 0.6]
    assert loss.item() == pytest.approx(0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    loss.backward()
    # forward KL gradient w.r.t. the student's logits over the k ids is q - p
    assert torch.allclose(student.grad, t64([[[0.2 / 0.6 - 0.5, 0.3 / 0.6 - 0.5, 0.1 / 0.6]]]))
    assert torch.isfinite(metrics["gkd_divergence"])


# ---------------------------------------------------------------- SFT
def test_sft_loss_hand_case_both_aggregations():
    lp = t64([[-1.0, -3.0, 0.0], [-2.0, 0.0, 0.0]]).requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, metrics = sft_loss(lp, mask, aggregation="token_mean", num_tokens=3)
    assert loss.item() == pytest.approx(6 / 3)
    assert metrics["nll"].item() == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(lp.grad, -mask.double() / 3)
    seq, _ = sft_loss(lp, mask, aggregation="seq_mean_token_mean", num_tokens=3, num_seqs=2)
    assert seq.item() == pytest.approx((2.0 + 2.0) / 2)
