"""Truncated importance sampling for off-policy samples (algorithms/off_policy.py) and its wiring: the
weight multiplies each token's policy-gradient term of every policy-gradient objective, the PPO / TRRD ratio
stays anchored on the trainer's old log-probs, and the config turns it on by default only off-policy."""

import math

import pytest
import torch

from rlad_megatron.algorithms import build_objective
from rlad_megatron.algorithms.off_policy import truncated_is_metrics, truncated_is_weights
from rlad_megatron.config import AlgorithmConfig, load_config


def test_weights_are_the_ratio_truncated_at_the_cap():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    rollout = torch.tensor([[-1.0, -1.0, -2.0, -0.5]])  # ratios e^0, e^-1, e^1.5, e^-2.5
    weights, truncated = truncated_is_weights(old, rollout, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[1.0, math.exp(-1.0), 2.0, math.exp(-2.5)]]))
    assert truncated.tolist() == [[False, False, True, False]]


def test_a_very_unlikely_rollout_token_cannot_overflow():
    weights, truncated = truncated_is_weights(torch.tensor([0.0]), torch.tensor([-1e4]), cap=3.0)
    assert weights.tolist() == [3.0] and truncated.tolist() == [True]


def test_weights_carry_no_gradient_and_refuse_a_bad_cap():
    old = torch.zeros(3, requires_grad=True)
    weights, _ = truncated_is_weights(old, torch.zeros(3), cap=2.0)
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_is_weights(old, torch.zeros(3), cap=0.0)
    with pytest.raises(ValueError, match="share one shape"):
        truncated_is_weights(torch.zeros(3), torch.zeros(4), cap=2.0)


def test_metrics_are_token_mean_shares():
    weights = torch.tensor([[1.0, 3.0, 2.0, 100.0]])
    truncated = torch.tensor([[False, True, True, False]])
    mask = torch.tensor([[True, True, True, False]])
    metrics = truncated_is_metrics(weights, truncated, mask, num_tokens=3)
    assert metrics["tis/weight_mean"].item() == pytest.approx(2.0)
    assert metrics["tis/truncated_frac"].item() == pytest.approx(2 / 3)


def _batch(rollout_shift: torch.Tensor):
    """A packed [1, 6] micro-batch of two responses (3 tokens each) with mixed-sign advantages."""
    torch.manual_seed(0)
    logprobs = (-torch.rand(1, 6) - 0.1).requires_grad_()
    old = logprobs.detach() + 0.05 * torch.randn(1, 6)
    return {
        "logprobs": logprobs,
        "old_logprobs": old,
        "rollout_logprobs": old - rollout_shift,
        "teacher_logprobs": old + 0.3 * torch.randn(1, 6),
        "advantages": torch.tensor([[1.0, 1.0, 1.0, -0.5, -0.5, -0.5]]),
        "mask": torch.ones(1, 6, dtype=torch.bool),
        "seq_weights": torch.full((1, 6), 1 / 3),
    }


@pytest.mark.parametrize("name", ["grpo", "rlad", "kdrl", "opd"])
def test_the_weight_multiplies_each_tokens_policy_gradient_term(name):
    """With weights w_t, the loss gradient of token t is w_t times the unweighted one (TIS leaves the ratio
    and its clip alone); with rollout == old log-probs every weight is 1 and the loss is unchanged."""
    shift = torch.tensor([[0.0, 0.3, -0.4, 2.0, -1.0, 0.1]])  # lp_old - lp_rollout; 2.0 is truncated at cap 2
    extra = {"kd_estimator": "k1"} if name == "kdrl" else {}  # k1: no separate KD loss term to leave unweighted
    plain = build_objective(AlgorithmConfig(name=name, **extra))
    tis = build_objective(AlgorithmConfig(name=name, tis_cap=2.0, **extra))
    assert "rollout_logprobs" in tis.required_batch_keys and "rollout_logprobs" not in plain.required_batch_keys

    grads = {}
    for label, objective, batch in (("plain", plain, _batch(shift)), ("tis", tis, _batch(shift))):
        loss, metrics = objective.loss(batch, num_tokens=6, num_seqs=2)
        loss.backward()
        grads[label] = batch["logprobs"].grad.clone()
        if label == "tis":
            expected = torch.minimum(torch.exp(shift), torch.tensor(2.0))
            assert metrics["tis/weight_mean"].item() == pytest.approx(expected.mean().item(), rel=1e-6)
            assert metrics["tis/truncated_frac"].item() == pytest.approx(1 / 6)
    assert torch.allclose(grads["tis"], grads["plain"] * expected, atol=1e-7)

    on_policy = _batch(torch.zeros(1, 6))
    assert tis.loss(on_policy, num_tokens=6, num_seqs=2)[0].item() == pytest.approx(
        plain.loss(_batch(torch.zeros(1, 6)), num_tokens=6, num_seqs=2)[0].item(), abs=1e-7
    )


def test_supervised_objectives_have_no_weight_and_a_missing_column_is_named():
    assert build_objective(AlgorithmConfig(name="gkd")).tis_cap == 0.0
    tis = build_objective(AlgorithmConfig(name="grpo", tis_cap=2.0))
    batch = _batch(torch.zeros(1, 6))
    del batch["rollout_logprobs"]
    with pytest.raises(ValueError, match=r"needs batch keys \['rollout_logprobs'\]"):
        tis.loss(batch, num_tokens=6, num_seqs=2)


def test_config_turns_tis_on_by_default_only_off_policy():
    assert load_config(None, []).algorithm.tis_cap == 0.0
    assert load_config(None, ["train.max_staleness=1"]).algorithm.tis_cap == 2.0
    assert load_config(None, ["train.max_staleness=1", "algorithm.tis_cap=0"]).algorithm.tis_cap == 0.0
    assert load_config(None, ["algorithm.tis_cap=3"]).algorithm.tis_cap == 3.0  # numerics mismatch only
    assert load_config(None, ["train.max_staleness=1", "algorithm.name=gkd"]).algorithm.tis_cap == 0.0


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.max_staleness=2"], r"train.max_staleness=2 is invalid: must be 0 or 1"),
        (["algorithm.tis_cap=0.5"], r"algorithm.tis_cap=0.5 is invalid: must be 0 \(off\) or >= 1"),
        (["algorithm.name=gkd", "algorithm.tis_cap=2"], r"algorithm.tis_cap=2.0 weights the policy-gradient term"),
        (["algorithm.name=sft", "train.max_staleness=1"], r"'sft'.*has no student rollouts; set train.max_staleness=0"),
        (["train.mode=rollout_only", "train.max_staleness=1"], r"no generation and training in the same run"),
    ],
)
def test_bad_off_policy_settings_name_the_fix(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, overrides)
