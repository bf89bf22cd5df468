"""Where a response token's log-prob comes from: pure index arithmetic, no torch, no I/O.

A causal LM's logits at position p predict token p + 1. For a sequence ids = prompt + response
with prompt length P, response token j (absolute position P + j) is scored by the logits at
position P + j - 1. Every off-by-one in teacher scoring is one of these functions; they are
small on purpose and tested exhaustively (tests/unit/test_teacher_alignment.py).

SGLang's `/generate` with `return_logprob` and `logprob_start_len = s` returns
`meta_info.input_token_logprobs` with one entry per input token from position s on, where the
entry for token s is always `[None, id, ...]` (no log-prob for the first returned token) and
entry k (k >= 1) is log p(ids[s + k] | ids[:s + k]). To get the response of a prompt of length
P we therefore ask for s = P - 1 and drop entry 0 (or any smaller s, dropping P - s entries: a
batch through sglang-router must share one integer s).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def response_logit_positions(seq_len: int, response_start: int) -> list[int]:
    """Logit positions scoring ids[response_start:], i.e. [response_start - 1, seq_len - 2]."""
    if not 1 <= response_start <= seq_len:
        raise ValueError(f"response_start={response_start} must be in [1, seq_len={seq_len}]")
    return list(range(response_start - 1, seq_len - 1))


def gather_response_logprobs(
    token_logprobs: Sequence[Sequence[float]], ids: Sequence[int], response_start: int
) -> list[float]:
    """From a full [seq_len][vocab] log-prob table, the log-probs of ids[response_start:]."""
    return [token_logprobs[p][ids[p + 1]] for p in response_logit_positions(len(ids), response_start)]


def logprob_start_len_for(response_start: int) -> int:
    """The SGLang `logprob_start_len` that makes input_token_logprobs cover the response."""
    if response_start < 1:
        raise ValueError(f"response_start={response_start} must be >= 1: the first token has no log-prob")
    return response_start - 1


def response_from_input_logprobs(
    input_token_logprobs: Sequence[Sequence],
    ids: Sequence[int],
    response_start: int,
    input_top_logprobs: Sequence | None = None,
    logprob_start_len: int | None = None,
) -> tuple[list[float], np.ndarray | None, np.ndarray | None]:
    """Decode SGLang's meta_info input logprobs over ids[response_start:].

    input_token_logprobs: [[logprob | None, token_id, text | None], ...], one per token from position
    `logprob_start_len` (default logprob_start_len_for(response_start); a batch sharing one smaller
    start is fine: the extra prompt entries are skipped). Checks that the echoed token ids are the
    student's tokens. Returns (logprobs, topk_ids, topk_logprobs); the top-k as int32 / float32 arrays [n, k].
    """
    start = logprob_start_len_for(response_start) if logprob_start_len is None else logprob_start_len
    if not 0 <= start < response_start:
        raise ValueError(f"logprob_start_len={start} must be in [0, response_start={response_start})")
    expected = len(ids) - start
    if len(input_token_logprobs) != expected:
        raise ValueError(
            f"server returned {len(input_token_logprobs)} input log-probs, expected {expected} "
            f"(len(ids)={len(ids)}, logprob_start_len={start})"
        )
    skip = response_start - start  # entry index of token response_start (entry 0 is always None)
    entries = list(input_token_logprobs)[skip:]
    echoed = [int(e[1]) for e in entries]
    if echoed != list(ids[response_start:]):
        raise ValueError("server echoed different token ids than were sent: tokenizers or request mixed up")
    if any(e[0] is None for e in entries):
        raise ValueError("server returned a null log-prob inside the response span")
    logprobs = [float(e[0]) for e in entries]
    if input_top_logprobs is None:
        return logprobs, None, None
    if len(input_top_logprobs) != expected:
        raise ValueError(f"server returned {len(input_top_logprobs)} top-logprob entries, expected {expected}")
    tops = list(input_top_logprobs)[skip:]
    k = len(tops[0]) if tops else 0
    if any(len(row) != k for row in tops):
        raise ValueError("server returned top-logprob rows of different lengths")
    # one pass over the [logprob, id, text] triples into flat arrays (float32: what the server computed in)
    flat = [v for row in tops for t in row for v in (t[0], t[1])]
    pairs = np.array(flat, dtype=np.float64).reshape(len(tops), k, 2)
    if np.isnan(pairs).any():
        raise ValueError("server returned a null top log-prob inside the response span")
    return logprobs, pairs[..., 1].astype(np.int32), pairs[..., 0].astype(np.float32)


def drop_final_token(values: list, response_ids: Sequence[int], eos_token_ids: Sequence[int]) -> list:
    """Per-token values with the last entry removed when the response ends in an EOS token."""
    if response_ids and response_ids[-1] in set(eos_token_ids):
        return list(values[:-1])
    return list(values)
