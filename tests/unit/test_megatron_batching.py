"""Packing and dynamic micro-batching (pure tensors, no Megatron)."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.backends.megatron.batching import (
    first_fit_decreasing,
    make_micro_batches,
    pack_samples,
    pad_samples,
    sequence_length,
    split_for_data_parallel,
)
from rlad_megatron.types import Sample


def _sample(prompt, response, **kw):
    return Sample(prompt_ids=list(prompt), response_ids=list(response), **kw)


def test_pack_layout_targets_mask_positions_and_boundaries():
    a, b = _sample([5, 6, 7], [8, 9]), _sample([10], [11, 12, 13])
    batch = pack_samples([a, b], {"advantages": [[0.5, 0.5], [-1.0, -2.0, -3.0]]}, pad_to_multiple=4)
    t = {k: v[0].tolist() for k, v in batch.tensors.items()}
    # a: inputs 5 6 7 8 -> targets 6 7 8 9 ; b: inputs 10 11 12 -> targets 11 12 13 ; padded to 8
    assert t["tokens"] == [5, 6, 7, 8, 10, 11, 12, 0]
    assert t["targets"] == [6, 7, 8, 9, 11, 12, 13, 0]
    assert t["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert t["mask"] == [0, 0, 1, 1, 1, 1, 1, 0]
    assert t["advantages"] == [0, 0, 0.5, 0.5, -1, -2, -3, 0]
    assert t["seq_weights"] == pytest.approx([0, 0, 0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 0])
    assert batch.cu_seqlens.tolist() == [0, 4, 7, 8]  # padding tail is its own sequence
    assert batch.max_seqlen == 4
    assert batch.response_spans == [(2, 4), (4, 7)]


def test_first_fit_decreasing_respects_budget_and_keeps_oversized_alone():
    bins = first_fit_decreasing([5, 3, 9, 2, 4, 12], capacity=10)
    sizes = [sum([5, 3, 9, 2, 4, 12][i] for i in b) for b in bins]
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(s <= 10 for s, b in zip(sizes, bins) if len(b) > 1)
    assert [5] in bins  # the 12-token item sits alone
    assert len(bins) == 4  # 12 | 9 | 5+4 | 3+2 (total 35 needs >= 4 bins of 10)


def test_micro_batches_cover_every_sample_once_with_uniform_length_option():
    samples = [_sample([1] * (i % 3 + 1), [2] * (i % 4 + 1)) for i in range(9)]
    lengths = [sequence_length(s) for s in samples]
    batches = make_micro_batches(samples, None, micro_batch_tokens=8, uniform_length=True, pad_to_multiple=2)
    seen = sorted(i for b in batches for i in b.sample_indices)
    assert seen == list(range(9))
    assert len({b.num_tokens for b in batches}) == 1 and batches[0].num_tokens % 2 == 0
    for b in batches:
        assert sum(lengths[i] for i in b.sample_indices) <= 8
        assert int(b.tensors["mask"].sum()) == sum(len(samples[i].response_ids) for i in b.sample_indices)


def test_data_parallel_split_is_balanced_and_complete():
    samples = [_sample([1] * n, [2]) for n in (9, 1, 4, 4, 3, 7)]
    shards = split_for_data_parallel(samples, 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    loads = [sum(sequence_length(samples[i]) for i in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= 2


def test_padded_layout_rows_match_packed_values():
    samples = [_sample([3, 4], [5, 6, 7]), _sample([8, 9, 10, 11], [12])]
    padded = pad_samples(samples)
    assert padded["tokens"].shape == (2, 4)
    assert padded["mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert padded["targets"][1, 3].item() == 12


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="empty prompt_ids"):
        pack_samples([_sample([], [1, 2])])
    with pytest.raises(ValueError, match="advantages has 1 values for 2 response tokens"):
        pack_samples([_sample([1], [2, 3])], {"advantages": [[0.1]]})
    with pytest.raises(ValueError, match="teacher_topk_ids"):
        pack_samples([_sample([1], [2, 3])], topk=True)


def test_topk_columns_are_placed_on_response_positions():
    s = _sample([1, 2], [3, 4], teacher_topk_ids=[[3, 9], [4, 8]], teacher_topk_logprobs=[[-0.1, -2.0], [-0.2, -3.0]])
    batch = pack_samples([s], topk=True)
    assert batch.tensors["teacher_topk_ids"][0].tolist() == [[0, 0], [3, 9], [4, 8]]
    assert torch.allclose(batch.tensors["teacher_topk_logprobs"][0, 1], torch.tensor([-0.1, -2.0]))
