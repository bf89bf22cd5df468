"""Teacher log-probs on the student's exact tokens, filled into Samples in place.

Each sample is scored as ids = prompt_ids + response_ids with response_start = len(prompt_ids),
so teacher_logprobs[j] = log p_T(response_ids[j] | prompt, response[:j]) (temperature 1), one
value per response token, aligned with rollout_logprobs (teacher/alignment.py has the index
arithmetic). With top_k > 0 (GKD) the teacher's top-k ids and log-probs per position are filled
too.

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

from rlad_megatron.engines.base import EngineError
from rlad_megatron.types import Sample


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
    topk_ids = list(out.topk_ids) if (out is not None and top_k) else []
    topk_lps = list(out.topk_logprobs) if (out is not None and top_k) else []
    if top_k and (len(topk_ids) != n or any(len(row) != top_k for row in topk_ids)):
        raise EngineError(f"teacher top-k has the wrong shape (expected {n} x {top_k})")
    if drop:  # placeholder at the final EOS, masked by the objective
        final = s.response_ids[-1]
        placeholder = s.rollout_logprobs[-1] if len(s.rollout_logprobs) == len(s.response_ids) else 0.0
        logprobs.append(float(placeholder))
        if top_k:
            topk_ids.append([final] * top_k)
            topk_lps.append([float(placeholder)] * top_k)
    s.teacher_logprobs = logprobs
    s.teacher_topk_ids = topk_ids if top_k else None
    s.teacher_topk_logprobs = topk_lps if top_k else None
