"""`build_objective`: what each algorithm asks of the loop, its token advantages, and that its loss
is exactly the documented function call (so the trainer never needs to know algorithm names)."""

import pytest
import torch

from rlad_megatron.algorithms import (
    build_objective,
    gkd_loss,
    group_advantages,
    kd_loss,
    policy_loss,
    sft_loss,
    trrd_loss,
)
from rlad_megatron.algorithms.objectives import OBJECTIVES, zero_advantage_groups
from rlad_megatron.config import ALGORITHMS, AlgorithmConfig


def cfg(name, **kw):
    return AlgorithmConfig(name=name, **kw)


def test_every_configurable_algorithm_has_an_objective():
    assert set(OBJECTIVES) == set(ALGORITHMS)
    with pytest.raises(ValueError, match="choose one of"):
        build_objective(type("C", (), {"name": "ppo"})())


@pytest.mark.parametrize(
    "name,teacher,top_k,old,rewards",
    [
        ("grpo", False, 0, True, True),
        ("rlad", True, 0, True, True),
        ("kdrl", True, 0, True, True),
        ("opd", True, 0, True, False),
        ("gkd", True, 8, False, False),
        ("sft", False, 0, False, False),
    ],
)
def test_what_each_objective_needs(name, teacher, top_k, old, rewards):
    obj = build_objective(cfg(name))
    assert (obj.needs_teacher, obj.teacher_top_k, obj.needs_old_logprobs, obj.uses_rewards) == (
        teacher,
        top_k,
        old,
        rewards,
    )
    assert obj.needs_ref is False
    assert "mask" in obj.required_batch_keys
    assert ("seq_weights" in obj.required_batch_keys) is True  # default aggregation is seq_mean_token_mean
    assert "seq_weights" not in build_objective(cfg(name, aggregation="token_mean")).required_batch_keys


def test_required_keys_follow_the_config():
    assert build_objective(cfg("grpo", ref_kl_coef=0.1)).needs_ref
    assert "ref_logprobs" in build_objective(cfg("rlad", ref_kl_coef=0.1)).required_batch_keys
    assert not build_objective(cfg("sft", ref_kl_coef=0.1)).needs_ref  # no ratio, no reference term
    assert build_objective(cfg("opd", opd_reward_coef=0.5)).uses_rewards
    k1 = build_objective(cfg("kdrl", kd_estimator="k1"))
    assert "teacher_logprobs" not in k1.required_batch_keys  # the teacher enters through advantages only
    assert "rewards" in build_objective(cfg("kdrl", kd_reward_mask=True)).required_batch_keys
    gkd = build_objective(cfg("gkd", gkd_top_k=4))
    assert {"student_topk_logprobs", "teacher_topk_logprobs"} <= set(gkd.required_batch_keys)


def test_loss_names_missing_batch_keys():
    obj = build_objective(cfg("rlad", aggregation="token_mean"))
    batch = {"logprobs": torch.zeros(1, 2), "mask": torch.ones(1, 2, dtype=torch.bool)}
    with pytest.raises(ValueError, match="old_logprobs.*advantages.*teacher_logprobs"):
        obj.loss(batch, num_tokens=2, num_seqs=1)


def _batch(seed=0, shape=(3, 5), k=4):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(shape, generator=g, dtype=torch.float64) * 2
    return {
        "logprobs": lp.clone().requires_grad_(True),
        "old_logprobs": lp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64),
        "teacher_logprobs": lp + torch.randn(shape, generator=g, dtype=torch.float64),
        "ref_logprobs": lp + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64),
        "advantages": torch.randn(shape, generator=g, dtype=torch.float64),
        "mask": torch.rand(shape, generator=g) < 0.8,
        "teacher_mask": torch.rand(shape, generator=g) < 0.8,
        "rewards": torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64).expand(shape),
        "student_topk_logprobs": -torch.rand(*shape, k, generator=g, dtype=torch.float64),
        "teacher_topk_logprobs": -torch.rand(*shape, k, generator=g, dtype=torch.float64),
    }


AGG = {"aggregation": "token_mean", "num_tokens": 11}


def test_loss_dispatch_is_exactly_the_documented_call():
    b = _batch()
    pol = dict(clip_low=0.2, clip_high=0.28, **AGG)
    both = b["mask"] & b["teacher_mask"]
    expected = {
        "grpo": policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], **pol)[0],
        "opd": policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], **pol)[0],
        "rlad": trrd_loss(
            b["logprobs"],
            b["old_logprobs"],
            b["teacher_logprobs"],
            b["advantages"],
            b["mask"],
            alpha=0.3,
            teacher_log_ratio_clamp=1.0,
            teacher_mask=b["teacher_mask"],
            **pol,
        )[0],
        "kdrl": policy_loss(b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], **pol)[0]
        + kd_loss(
            b["logprobs"],
            b["teacher_logprobs"],
            both,
            kind="k2",
            coef=5e-3 - 5e-5 * 10,
            correct=b["rewards"] >= 1.0,
            **AGG,
        )[0],
        "gkd": gkd_loss(
            b["student_topk_logprobs"], b["teacher_topk_logprobs"], both, divergence="jsd", jsd_beta=0.5, **AGG
        )[0],
        "sft": sft_loss(b["logprobs"], b["mask"], **AGG)[0],
    }
    extra = {"rlad": {"alpha": 0.3}, "kdrl": {"kd_schedule": "annealed", "kd_reward_mask": True}}
    for name, want in expected.items():
        obj = build_objective(cfg(name, aggregation="token_mean", **extra.get(name, {})))
        got, metrics = obj.loss(b, num_tokens=11, num_seqs=3, step=10)
        assert torch.allclose(got, want, rtol=1e-12), name
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values()), name
    assert build_objective(cfg("kdrl", kd_schedule="annealed")).step_scalars(10) == {"kd_coef": pytest.approx(4.5e-3)}


def test_token_advantages_grpo_broadcasts_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    lens = [3, 1, 2, 4, 2, 2, 1, 5]
    per_seq = build_objective(cfg("grpo")).token_advantages(rewards, 4, seq_lens=lens)
    group = group_advantages(rewards, 4)
    assert [a.numel() for a in per_seq] == lens
    for a, g in zip(per_seq, group):
        assert torch.all(a == g)
    assert all(a.abs().sum() == 0 for a in per_seq[4:])  # an all-correct group carries nothing


def test_token_advantages_opd_with_final_eos_dropped():
    obj = build_objective(cfg("opd", opd_coef=2.0, drop_final_eos_from_teacher=True))
    old = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    teacher = [torch.tensor([-1.5, -1.0]), torch.tensor([-0.1])]
    out = obj.token_advantages(
        None, 2, seq_lens=[2, 1], old_logprobs=old, teacher_logprobs=teacher, ends_with_eos=[True, False]
    )
    assert torch.allclose(out[0], torch.tensor([-1.0, 0.0]))  # final EOS gets no teacher term
    assert torch.allclose(out[1], torch.tensor([0.8]))  # -2 * (-0.5 - -0.1): the teacher likes it
    packed = obj.token_advantages(
        None,
        2,
        seq_lens=[2, 1],
        old_logprobs=torch.cat(old),
        teacher_logprobs=torch.cat(teacher),
        ends_with_eos=[True, False],
    )
    assert all(torch.equal(a, b) for a, b in zip(out, packed))
    with_reward = build_objective(cfg("opd", opd_reward_coef=0.5))
    out = with_reward.token_advantages(
        torch.tensor([1.0, 0.0]), 2, seq_lens=[2, 1], old_logprobs=old, teacher_logprobs=teacher
    )
    assert torch.allclose(out[1], torch.tensor([0.5 * -1.0 + 0.4]), atol=1e-5)


def test_token_advantages_kdrl_k1_with_reward_mask():
    obj = build_objective(cfg("kdrl", kd_estimator="k1", kd_coef=0.1, kd_reward_mask=True))
    rewards = torch.tensor([1.0, 0.0])
    old = [torch.tensor([-1.0]), torch.tensor([-1.0, -2.0])]
    teacher = [torch.tensor([-3.0]), torch.tensor([-0.5, -2.5])]
    out = obj.token_advantages(rewards, 2, seq_lens=[1, 2], old_logprobs=old, teacher_logprobs=teacher, step=0)
    adv = group_advantages(rewards, 2)
    assert torch.allclose(out[0], adv[0].expand(1))  # correct response: no KD term
    assert torch.allclose(out[1], adv[1] + 0.1 * torch.tensor([0.5, -0.5]))


def test_token_advantages_supervised_are_zero_and_inputs_are_checked():
    for name in ("gkd", "sft"):
        out = build_objective(cfg(name)).token_advantages(None, 2, seq_lens=[2, 3])
        assert [a.tolist() for a in out] == [[0.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="needs rewards"):
        build_objective(cfg("grpo")).token_advantages(None, 2, seq_lens=[1, 1])
    with pytest.raises(ValueError, match="old_logprobs"):
        build_objective(cfg("opd")).token_advantages(None, 1, seq_lens=[1], teacher_logprobs=[torch.zeros(1)])
    with pytest.raises(ValueError, match="seq_lens"):
        build_objective(cfg("opd")).token_advantages(
            None, 1, seq_lens=[2], old_logprobs=[torch.zeros(3)], teacher_logprobs=[torch.zeros(2)]
        )


def test_teacher_token_mask_and_zero_advantage_helper():
    on = build_objective(cfg("rlad", drop_final_eos_from_teacher=True))
    off = build_objective(cfg("rlad"))
    assert on.teacher_token_mask(3, True).tolist() == [True, True, False]
    assert on.teacher_token_mask(3, False).tolist() == [True, True, True]
    assert off.teacher_token_mask(3, True).tolist() == [True, True, True]
    mask, frac = zero_advantage_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert mask.tolist() == [True, False] and frac.item() == 0.5


def test_docs_name_every_field_objective_and_metric():
    """docs/algorithms.md must keep up with the code: config fields, objective names, metric keys."""
    import dataclasses
    from pathlib import Path

    from test_algorithms_split import CONFIGS, make_responses, padded

    doc = (Path(__file__).resolve().parents[2] / "docs" / "algorithms.md").read_text()
    for f in dataclasses.fields(AlgorithmConfig):
        assert f"`{f.name}`" in doc, f.name
    for name in OBJECTIVES:
        assert f"`{name}`" in doc, name
    batch = padded(make_responses(0))
    for case, fields in CONFIGS.items():
        obj = build_objective(AlgorithmConfig(**{"name": case, **fields}))
        _, metrics = obj.loss(batch, num_tokens=10, num_seqs=6, step=0)
        for key in [*metrics, *obj.step_scalars(0)]:
            assert f"`{key}`" in doc, (case, key)
