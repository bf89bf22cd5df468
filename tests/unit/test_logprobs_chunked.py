"""Chunked log-probs (output layer + softmax statistics a few positions at a time) equal the whole-logits path.

Reference: logits of all positions at once (`hidden @ weight.T`), then the vocab-parallel functions the
trainer uses without chunking. Values and gradients (hidden states and output weight) within 1e-6 in
float64 (the maths is the same); in float32 within 1e-5, the rounding of matmuls and gradient sums whose
blocking depends on the number of rows. Chunk sizes that do not divide the number of positions, and
vocabulary padding columns (125 of 128 valid).
The TP=2 case runs in tests/distributed/test_megatron_worker.py.
"""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.backends.megatron.logprobs import (
    chunked_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
    vocab_parallel_topk_logprobs,
)
from rlad_megatron.config import ModelConfig

VOCAB, PADDED, HIDDEN, POSITIONS, TEMPERATURE = 125, 128, 16, 37, 0.7


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(POSITIONS, HIDDEN, generator=gen, dtype=dtype)
    weight = torch.randn(PADDED, HIDDEN, generator=gen, dtype=dtype) * 0.3  # logits of order 1
    targets = torch.randint(0, VOCAB, (POSITIONS,), generator=gen)
    topk = torch.randint(0, VOCAB, (POSITIONS, 4), generator=gen)
    mix = torch.randn(POSITIONS, 5, generator=gen, dtype=dtype)
    return hidden, weight, targets, topk, mix


def _outputs_and_grads(chunk_size: int, dtype):
    hidden, weight, targets, topk, mix = _inputs(dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    sampling = {"temperature": TEMPERATURE, "vocab_size": VOCAB}
    if chunk_size:
        out = chunked_logprobs(
            hidden, weight, targets, chunk_size=chunk_size, topk_ids=topk, with_entropy=True, **sampling
        )
        lp, ent, tk = out["logprobs"], out["entropy"], out["topk_logprobs"]
    else:
        logits = hidden @ weight.t()
        lp = vocab_parallel_logprobs(logits, targets, **sampling)
        tk = vocab_parallel_topk_logprobs(logits, topk, **sampling)
        ent = vocab_parallel_entropy(logits.detach(), **sampling)
    ((lp * mix[:, 0]).sum() + (tk * mix[:, 1:]).sum()).backward()
    return [lp.detach(), ent, tk.detach()], [hidden.grad, weight.grad]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [1, 5, POSITIONS, 1000])
def test_chunked_logprobs_entropy_topk_and_grads_equal_whole_logits(chunk_size, dtype, tol):
    ref_values, ref_grads = _outputs_and_grads(0, dtype)
    values, grads = _outputs_and_grads(chunk_size, dtype)
    assert ref_grads[0].abs().max() > 1e-2 and ref_grads[1].abs().max() > 1e-2
    for got, want in zip(values, ref_values):
        assert got.shape == want.shape and got.dtype == dtype
        assert (got - want).abs().max().item() < tol
    for got, want in zip(grads, ref_grads):
        assert (got - want).abs().max().item() < tol
    assert grads[1][VOCAB:].abs().max().item() == 0.0  # padded vocabulary rows get no gradient


def test_chunked_backward_recomputes_chunks_instead_of_keeping_logits():
    """The autograd graph keeps per chunk only its inputs, not [chunk, V] logits / exp tensors."""
    hidden, weight, targets, _, _ = _inputs()
    hidden.requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_logprobs(hidden, weight, targets, chunk_size=8, temperature=TEMPERATURE, vocab_size=VOCAB)
    assert saved, "nothing saved for backward"
    assert all(shape[-1] not in (PADDED, VOCAB) for shape in saved), saved  # no [*, V] tensor


def test_chunk_size_is_validated():
    hidden, weight, targets, _, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"model\.logprob_chunk_size=-1 is invalid"):
        ModelConfig(logprob_chunk_size=-1)
    assert ModelConfig().logprob_chunk_size > 0
