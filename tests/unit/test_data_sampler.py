"""PromptSampler: seeded order, epoch wrap, exact continuation after state_dict / load_state_dict."""

import json

import pytest

from rlad_megatron.data import PromptSampler


def draw(sampler, sizes):
    return [sampler.next_batch(n) for n in sizes]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("cut", [0, 1, 3, 7])
def test_resume_mid_epoch_continues_exactly(shuffle, cut):
    data = list(range(10))
    sizes = [3, 4, 2, 5, 6, 3, 10, 1]
    reference = draw(PromptSampler(data, seed=5, shuffle=shuffle), sizes)
    first = PromptSampler(data, seed=5, shuffle=shuffle)
    head = draw(first, sizes[:cut])
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(data, seed=5, shuffle=shuffle)
    resumed.load_state_dict(state)
    assert head + draw(resumed, sizes[cut:]) == reference


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = PromptSampler(list(range(20)), seed=1)
    e0, e1 = sampler.next_batch(20), sampler.next_batch(20)
    assert sorted(e0) == sorted(e1) == list(range(20)) and e0 != e1
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 20
    assert PromptSampler(list(range(20)), seed=2).next_batch(20) != e0
    assert PromptSampler(list(range(5)), shuffle=False).next_batch(7) == [0, 1, 2, 3, 4, 0, 1]


def test_bad_states_and_arguments_are_refused():
    sampler = PromptSampler(list(range(4)), seed=0)
    with pytest.raises(ValueError, match="same data, seed"):
        PromptSampler(list(range(5)), seed=0).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="same data, seed"):
        PromptSampler(list(range(4)), seed=1).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="outside"):
        sampler.load_state_dict(dict(sampler.state_dict(), position=9))
    with pytest.raises(ValueError, match=">= 1"):
        sampler.next_batch(0)
    with pytest.raises(ValueError, match="non-empty"):
        PromptSampler([], seed=0)
