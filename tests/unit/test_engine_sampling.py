"""Counter-based sampling: exact categorical draws from the truncated temperature-scaled distribution."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.engines.base import SamplingParams, sample_seed
from rlad_megatron.engines.sampling import sample_next, truncation_mask, uniform_noise


def _draw(logits, temperature=1.0, top_p=1.0, top_k=-1, n=20000):
    rows = logits.expand(n, -1)
    t = torch.full((n,), temperature)
    tokens, lps = sample_next(
        rows,
        t,
        torch.full((n,), top_p),
        torch.full((n,), top_k, dtype=torch.int64),
        torch.arange(n, dtype=torch.int64),
        torch.zeros(n, dtype=torch.int64),
    )
    return tokens, lps


def test_empirical_frequencies_match_the_truncated_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    tokens, lps = _draw(logits, temperature=0.8, top_p=0.85)
    probs = (logits[0] / 0.8).softmax(-1)
    keep = probs.cumsum(-1) - probs < 0.85  # sorted already: nucleus
    want = torch.where(keep, probs, torch.zeros_like(probs))
    want = want / want.sum()
    freq = torch.bincount(tokens, minlength=6).float() / len(tokens)
    assert torch.allclose(freq, want, atol=0.015), (freq, want)
    # reported log-probs: temperature-scaled, BEFORE truncation
    assert torch.allclose(lps, (logits[0] / 0.8).log_softmax(-1)[tokens])


def test_top_k_and_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    tokens, _ = _draw(logits, top_k=2, n=4000)
    assert set(tokens.tolist()) == {1, 2}
    tokens, lps = _draw(logits, temperature=0.0, n=10)
    assert tokens.tolist() == [1] * 10 and torch.allclose(lps, logits[0].log_softmax(-1)[1].expand(10))


def test_truncation_keeps_at_least_one_token():
    scaled = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = truncation_mask(scaled, torch.tensor([1e-6, 0.5]), torch.tensor([-1, 2]))
    assert mask[0].tolist() == [True, False, False] and mask[1].sum() >= 1


def test_noise_is_a_pure_function_of_seed_and_step():
    a = uniform_noise(torch.tensor([1, 2, 1]), torch.tensor([0, 0, 1]))
    b = uniform_noise(torch.tensor([2, 1]), torch.tensor([0, 0]))
    assert a[0] == b[1] and a[1] == b[0] and len(set(a.tolist())) == 3
    many = uniform_noise(torch.arange(20000), torch.zeros(20000, dtype=torch.int64))
    assert float(many.min()) > 0 and float(many.max()) < 1 and abs(float(many.mean()) - 0.5) < 0.01


def test_sample_seed_and_params_validation():
    assert sample_seed(None, 1, 2) is None
    assert len({sample_seed(3, i, s) for i in range(20) for s in range(8)}) == 160
    for bad in ({"temperature": -0.1}, {"top_p": 0.0}, {"top_k": 0}, {"max_new_tokens": -1}, {"stop_token_ids": (-1,)}):
        with pytest.raises(ValueError, match="invalid SamplingParams"):
            SamplingParams(**bad)
