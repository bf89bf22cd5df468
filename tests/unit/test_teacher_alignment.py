"""Teacher alignment: the pure index helpers, SGLang's input-logprob layout, and score_samples end to end."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from rlad_megatron.engines.base import EngineError
from rlad_megatron.teacher.alignment import (
    drop_final_token,
    gather_response_logprobs,
    logprob_start_len_for,
    response_from_input_logprobs,
    response_logit_positions,
)
from rlad_megatron.types import Sample


def test_response_positions_hand_computed():
    # ids = [p0, p1, p2, r0, r1]: r0 is predicted at position 2, r1 at position 3
    assert response_logit_positions(5, 3) == [2, 3]
    assert response_logit_positions(2, 1) == [0]
    assert response_logit_positions(4, 4) == []
    for bad in (0, 6):
        with pytest.raises(ValueError):
            response_logit_positions(5, bad)


@pytest.mark.parametrize("prompt_len", range(1, 7))
def test_gather_matches_slow_reference_for_every_prompt_length(prompt_len):
    g = torch.Generator().manual_seed(prompt_len)
    ids = torch.randint(0, 11, (prompt_len + 4,), generator=g).tolist()
    table = torch.randn(len(ids), 11, generator=g).log_softmax(-1)
    want = [float(table[prompt_len + j - 1, ids[prompt_len + j]]) for j in range(4)]  # the obvious loop
    assert gather_response_logprobs(table.tolist(), ids, prompt_len) == pytest.approx(want)


def test_sglang_input_logprobs_layout():
    ids = [7, 8, 9, 3, 4]  # prompt of 3, response [3, 4]
    start = logprob_start_len_for(3)
    assert start == 2
    entries = [[None, 9, None], [-0.5, 3, None], [-1.5, 4, None]]  # entry 0 (token at `start`) is None
    tops = [None, [[-0.5, 3, None], [-2.0, 1, None]], [[-1.0, 2, None], [-1.5, 4, None]]]
    lps, tids, tlps = response_from_input_logprobs(entries, ids, 3, tops)
    assert lps == [-0.5, -1.5] and tids.tolist() == [[3, 1], [2, 4]] and tlps.tolist() == [[-0.5, -2.0], [-1.0, -1.5]]
    assert tids.dtype == np.int32 and tlps.dtype == np.float32
    with pytest.raises(ValueError, match="expected 3"):
        response_from_input_logprobs(entries[1:], ids, 3)
    with pytest.raises(ValueError, match="echoed different token ids"):
        response_from_input_logprobs([[None, 9, None], [-0.5, 3, None], [-1.5, 5, None]], ids, 3)
    with pytest.raises(ValueError, match="response_start"):
        logprob_start_len_for(0)
    # a smaller shared start (batched through the router): extra prompt entries are skipped
    wider = [[None, 8, None], [-0.7, 9, None]] + entries[1:]
    wider_tops = [None, [[-0.7, 9, None], [-1.0, 0, None]]] + tops[1:]
    wide_lps, wide_tids, wide_tlps = response_from_input_logprobs(wider, ids, 3, wider_tops, logprob_start_len=1)
    assert wide_lps == lps and np.array_equal(wide_tids, tids) and np.array_equal(wide_tlps, tlps)
    with pytest.raises(ValueError, match="logprob_start_len"):
        response_from_input_logprobs(entries, ids, 3, logprob_start_len=3)


def test_drop_final_token():
    assert drop_final_token([1.0, 2.0], [5, 1], eos_token_ids=[1]) == [1.0]
    assert drop_final_token([1.0, 2.0], [5, 6], eos_token_ids=[1]) == [1.0, 2.0]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from rlad_megatron.engines.embedded import EmbeddedEngine
    from rlad_megatron.tiny_models import save_tiny_model

    d = tmp_path_factory.mktemp("teacher")
    save_tiny_model(d, "qwen2", seed=3)
    return EmbeddedEngine(str(d), max_score_tokens=64), AutoModelForCausalLM.from_pretrained(d).eval(), str(d)


def _samples(n_prompt_lengths=6, vocab=90):
    g = torch.Generator().manual_seed(0)
    out = []
    for plen in range(1, n_prompt_lengths + 1):
        rlen = 1 + (plen * 3) % 5
        out.append(
            Sample(
                prompt_ids=torch.randint(5, vocab, (plen,), generator=g).tolist(),
                response_ids=torch.randint(5, vocab, (rlen,), generator=g).tolist(),
                rollout_logprobs=[-1.0] * rlen,
                finish_reason="length",
            )
        )
    return out


def test_score_samples_equals_full_forward_for_padded_batches(teacher):
    from rlad_megatron.teacher import score_samples

    engine, hf, _ = teacher
    samples = _samples()
    score_samples(engine, samples, top_k=3)
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            full = hf(ids).logits[0].log_softmax(-1)  # one sequence alone: no padding anywhere
        P = len(s.prompt_ids)
        want = [float(full[P + j - 1, t]) for j, t in enumerate(s.response_ids)]
        assert s.teacher_logprobs == pytest.approx(want, abs=1e-4)
        vals, idx = full[P - 1 : -1].topk(3, dim=-1)
        assert s.teacher_topk_ids.tolist() == idx.tolist()
        torch.testing.assert_close(torch.tensor(s.teacher_topk_logprobs), vals, atol=1e-4, rtol=0)


def test_drop_final_eos_keeps_positions_and_skips_the_token(teacher):
    from rlad_megatron.teacher import score_samples

    engine, _, _ = teacher
    stopped = Sample(
        prompt_ids=[5, 6, 7], response_ids=[8, 9, 1], rollout_logprobs=[-1.0, -2.0, -3.0], finish_reason="stop"
    )
    plain = Sample(prompt_ids=[5, 6, 7], response_ids=[8, 9], rollout_logprobs=[-1.0, -2.0], finish_reason="length")
    score_samples(engine, [stopped, plain], drop_final_eos=True)
    assert len(stopped.teacher_logprobs) == 3 and stopped.teacher_logprobs[-1] == -3.0  # placeholder, masked later
    assert stopped.teacher_logprobs[:2] == pytest.approx(plain.teacher_logprobs, abs=1e-6)
    empty = Sample(prompt_ids=[5], response_ids=[], finish_reason="length")
    score_samples(engine, [empty])
    assert empty.teacher_logprobs == []


def test_teacher_unreachable_fails_loudly_and_quickly():
    from rlad_megatron.engines.client import HttpEngine
    from rlad_megatron.engines.fleet import free_port
    from rlad_megatron.teacher import score_samples

    engine = HttpEngine([f"http://127.0.0.1:{free_port()}"], request_timeout_s=3.0, max_retries=2, cooldown_s=0.2)
    samples = _samples(2)
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="refusing to continue without teacher log-probs.*unreachable"):
        score_samples(engine, samples)
    assert time.monotonic() - t0 < 10
    assert all(s.teacher_logprobs is None for s in samples)
    engine.close()


def test_tokenizer_check(tmp_path, teacher):
    from rlad_megatron.data.tokenizer import build_char_tokenizer
    from rlad_megatron.teacher import check_same_tokenizer

    _, _, same = teacher
    check_same_tokenizer(same, same)
    other = tmp_path / "other"
    build_char_tokenizer(other, alphabet="zyxwvutsrqponmlkjihgfedcba0123456789")
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_same_tokenizer(same, str(other))
