"""Teacher log-probs on the student's exact tokens, filled into Samples in place.

Each sample is scored as ids = prompt_ids + response_ids with response_start = len(prompt_ids),
so teacher_logprobs[j] = log p_T(response_ids[j] | prompt, response[:j]) (temperature 1), one
value per response token, aligned with rollout_logprobs (teacher/alignment.py has the index
arithmetic). With top_k > 0 (GKD) the teacher's top-k ids and log-probs per position are filled
too, as int32 / float32 arrays [len(response_ids), k].

drop_final_eos: a response that ends on a stop token (Sample.ends_with_stop_token: EOS or an extra
stop token) is sent WITHOUT that final token (the teacher may end turns with a different token, or
not know the student's EOS id at all); the
final position then holds a placeholder (the student's rollout log-prob) that the objective
masks out (Objective.teacher_token_mask), so every list keeps one entry per response token.

Failure policy: an engine error is re-raised with the number of samples affected; a result of
the wrong length raises. Nothing is ever left without teacher log-probs silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rlad_megatron.engines.base import EngineError
from rlad_megatron.types import Sample, topk_array


def score_samples(
    engine,
    samples: Sequence[Sample],
    top_k: int = 0,
    drop_final_eos: bool = False,
) -> None:
    """Fill sample.teacher_logprobs (and teacher_topk_ids / teacher_topk_logprobs when top_k > 0)."""
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0")
    todo: list[int] = []
    ids: list[list[int]] = []
    starts: list[int] = []
    drops: list[bool] = []
    for i, s in enumerate(samples):
        if not s.prompt_ids:
            raise ValueError(f"sample {i} has no prompt_ids; the teacher needs the prompt to score the response")
        drop = drop_final_eos and s.ends_with_stop_token
        response = s.response_ids[:-1] if drop else s.response_ids
        drops.append(drop)
        if response:
            todo.append(i)
            ids.append(list(s.prompt_ids) + list(response))
            starts.append(len(s.prompt_ids))
    try:
        outs = engine.score(ids, starts, top_k=top_k) if todo else []
    except EngineError as err:
        raise EngineError(
            f"teacher scoring failed for {len(todo)} samples; refusing to continue without teacher log-probs: {err}"
        ) from err
    if len(outs) != len(todo):
        raise EngineError(f"teacher returned {len(outs)} results for {len(todo)} sequences")
    results = dict(zip(todo, outs))
    for i, s in enumerate(samples):
        _fill(s, results.get(i), drops[i], top_k)


def _fill(s: Sample, out, drop: bool, top_k: int) -> None:
    n = len(s.response_ids) - (1 if drop else 0)
    logprobs = list(out.logprobs) if out is not None else []
    if len(logprobs) != n:
        raise EngineError(f"teacher returned {len(logprobs)} log-probs for a response span of {n} tokens")
    topk_ids = topk_lps = None
    if top_k and n:
        if out.topk_ids is None or out.topk_logprobs is None:
            raise EngineError(f"teacher returned no top-k for top_k={top_k}")
        topk_ids, topk_lps = topk_array(out.topk_ids, np.int32), topk_array(out.topk_logprobs, np.float32)
        if topk_ids.shape != (n, top_k) or topk_lps.shape != (n, top_k):
            raise EngineError(f"teacher top-k has the wrong shape (expected {n} x {top_k})")
    elif top_k:
        topk_ids, topk_lps = np.zeros((0, top_k), np.int32), np.zeros((0, top_k), np.float32)
    if drop:  # placeholder at the final EOS, masked by the objective
        final = s.response_ids[-1]
        placeholder = s.rollout_logprobs[-1] if len(s.rollout_logprobs) == len(s.response_ids) else 0.0
        logprobs.append(float(placeholder))
        if top_k:
            topk_ids = np.concatenate([topk_ids, np.full((1, top_k), final, np.int32)])
            topk_lps = np.concatenate([topk_lps, np.full((1, top_k), placeholder, np.float32)])
    s.teacher_logprobs = logprobs
    s.teacher_topk_ids = topk_ids
    s.teacher_topk_logprobs = topk_lps
