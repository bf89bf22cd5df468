"""The per-token columns' wire format between trainer ranks (`components.pack_columns` / `unpack_columns`):
exact round trips, offsets, empty selections, the lengths a rank keeps of samples it did not receive, and the
advantages and packed micro-batches built from received samples."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from rlad_megatron.backends.megatron.batching import pack_samples
from rlad_megatron.components import column_layout, column_offsets, pack_columns, unpack_columns, without_columns
from rlad_megatron.types import TOKEN_COLUMNS, AbsentColumn, Sample

K = 3


def make_samples(n: int = 6, seed: int = 0) -> list[Sample]:
    """As rank 0 holds them: ids and log-probs as Python lists (float64 values float32 must round), top-k arrays."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(1, 7)
        out.append(
            Sample(
                prompt_ids=[rng.randrange(0, 150_000) for _ in range(rng.randint(1, 5))],
                group_index=i // 2,
                response_ids=[rng.randrange(0, 150_000) for _ in range(length)],
                rollout_logprobs=[-rng.random() * 4 for _ in range(length)],
                teacher_logprobs=[-rng.random() * 4 for _ in range(length)],
                teacher_topk_ids=np.array(
                    [[rng.randrange(0, 150_000) for _ in range(K)] for _ in range(length)], np.int32
                ),
                teacher_topk_logprobs=np.array([[-rng.random() for _ in range(K)] for _ in range(length)], np.float32),
                reward=float(i % 2),
                finish_reason="stop",
            )
        )
    return out


def select(indices, names=TOKEN_COLUMNS) -> dict[str, list[int]]:
    return {name: list(indices) for name in names}


def receive(samples, selection):
    """What a receiving rank ends up with: the metadata pickled, the selected columns through pack / unpack."""
    light = pickle.loads(pickle.dumps(without_columns(samples)))
    flats = pack_columns(samples, selection)
    unpack_columns(light, selection, {name: flat.copy() for name, flat in flats.items()})
    return light, flats


def test_round_trip_is_exact_in_each_columns_dtype_and_leaves_lengths_elsewhere():
    samples = make_samples()
    light, flats = receive(samples, select([1, 4, 5]))
    assert {name: flat.dtype for name, flat in flats.items()} == {n: np.dtype(d) for n, d in TOKEN_COLUMNS.items()}
    for i, (got, sent) in enumerate(zip(light, samples)):
        for name, dtype in TOKEN_COLUMNS.items():
            if i in (1, 4, 5):
                assert got.holds(name)
                value = getattr(got, name)
                assert value.dtype == dtype
                assert np.array_equal(value, np.asarray(getattr(sent, name), dtype=dtype))
            else:
                assert not got.holds(name)
                assert getattr(got, name) == AbsentColumn(name, np.shape(getattr(sent, name)))
            assert len(getattr(got, name)) == len(getattr(sent, name))
        assert (got.reward, got.group_index, got.finish_reason) == (sent.reward, sent.group_index, sent.finish_reason)
        assert got.ends_with_stop_token == sent.ends_with_stop_token
    # float32 is what the trainer reads: the received log-probs give the very tensors the lists give
    assert torch.equal(
        torch.as_tensor(light[4].teacher_logprobs, dtype=torch.float32),
        torch.as_tensor(samples[4].teacher_logprobs, dtype=torch.float32),
    )


def test_offsets_point_at_each_samples_rows_in_selection_order():
    samples = make_samples()
    order = [5, 0, 3]
    flats = pack_columns(samples, select(order))
    for name in TOKEN_COLUMNS:
        offsets = column_offsets(samples, order, name)
        lengths = [len(getattr(samples[i], name)) for i in order]
        assert offsets.tolist() == [0, *np.cumsum(lengths).tolist()]
        for i, start, end in zip(order, offsets[:-1], offsets[1:]):
            expected = np.asarray(getattr(samples[i], name), dtype=TOKEN_COLUMNS[name])
            assert np.array_equal(flats[name][start:end], expected)


def test_a_rank_that_trains_no_samples_gets_no_columns_and_keeps_every_length():
    samples = make_samples()
    for selection in ({}, select([])):
        assert column_layout(samples, selection) == {}
        light, flats = receive(samples, selection)
        assert flats == {}
        assert not any(s.holds(name) for s in light for name in TOKEN_COLUMNS)
        assert [len(s.response_ids) for s in light] == [len(s.response_ids) for s in samples]


def test_columns_of_one_selection_each_their_own_samples_and_none_stays_none():
    samples = make_samples()
    for s in samples:  # a recipe without a teacher: no teacher columns at all
        s.teacher_logprobs = s.teacher_topk_ids = s.teacher_topk_logprobs = None
    selection = {"prompt_ids": [0, 1, 2], "response_ids": [0, 1, 2], "rollout_logprobs": [1]}
    light, flats = receive(samples, selection)
    assert list(flats) == ["prompt_ids", "response_ids", "rollout_logprobs"]
    assert light[0].holds("response_ids") and not light[0].holds("rollout_logprobs")
    assert light[1].holds("rollout_logprobs") and light[1].teacher_logprobs is None


def test_unpack_refuses_a_flat_array_whose_rows_do_not_match_the_lengths():
    samples = make_samples()
    light = without_columns(samples)
    flats = pack_columns(samples, select([0, 2]))
    flats["teacher_logprobs"] = flats["teacher_logprobs"][:-1]
    with pytest.raises(ValueError, match="teacher_logprobs: received"):
        unpack_columns(light, select([0, 2]), flats)


def test_token_ids_beyond_int32_are_refused_not_wrapped():
    samples = make_samples()
    samples[2].response_ids[0] = 2**31
    with pytest.raises(ValueError, match="response_ids holds values in .* beyond int32"):
        pack_columns(samples, select([2]))


def test_reading_a_column_this_rank_did_not_receive_raises_naming_it():
    light = without_columns(make_samples())
    with pytest.raises(LookupError, match="did not receive teacher_logprobs"):
        torch.as_tensor(np.asarray(light[0].teacher_logprobs))
    with pytest.raises(LookupError, match="did not receive response_ids"):
        list(light[0].response_ids)
    with pytest.raises(LookupError, match="did not receive prompt_ids"):
        pack_samples([light[0]])


def test_received_samples_pack_into_the_same_micro_batch_tensors():
    samples = make_samples()
    mine = [0, 3, 4]
    light, _ = receive(samples, select(mine))
    per_token = {key: [getattr(samples[i], key) for i in mine] for key in ("teacher_logprobs", "rollout_logprobs")}
    per_token_received = {key: [getattr(light[i], key) for i in mine] for key in per_token}
    want = pack_samples([samples[i] for i in mine], per_token, topk=True)
    got = pack_samples([light[i] for i in mine], per_token_received, topk=True)
    assert want.tensors.keys() == got.tensors.keys()
    for key, tensor in want.tensors.items():
        assert tensor.dtype == got.tensors[key].dtype and torch.equal(tensor, got.tensors[key]), key
    assert torch.equal(want.cu_seqlens, got.cu_seqlens)


@pytest.mark.parametrize("name", ["opd", "kdrl"])
def test_advantages_of_held_samples_equal_those_computed_from_every_samples_columns(name):
    from rlad_megatron.algorithms.objectives import build_objective
    from rlad_megatron.config import AlgorithmConfig

    cfg = AlgorithmConfig(name=name, group_size=2, kd_estimator="k1", kd_reward_mask=True, opd_reward_coef=0.5)
    objective = build_objective(cfg)
    samples = make_samples()
    light, _ = receive(samples, select([1, 2]))
    rng = random.Random(3)
    old = [[-rng.random() for _ in s.response_ids] for s in samples]
    common = dict(seq_lens=[len(s.response_ids) for s in samples], old_logprobs=old, step=1)
    common["ends_with_eos"] = [s.ends_with_stop_token for s in samples]
    rewards = torch.tensor([s.reward for s in samples])
    whole = objective.token_advantages(rewards, 2, teacher_logprobs=[s.teacher_logprobs for s in samples], **common)
    held = [s.teacher_logprobs if s.holds("teacher_logprobs") else None for s in light]
    part = objective.token_advantages(rewards, 2, teacher_logprobs=held, **common)
    assert all(part[i] is None for i in (0, 3, 4, 5))
    for i in (1, 2):
        assert torch.equal(part[i], whole[i])
    assert any(float(whole[i].abs().max()) > 0 for i in (1, 2))
