"""Math reward: extract the final answer, check equivalence with math-verify in a worker pool.

Extraction order (first that applies): the last `\\boxed{...}` / `\\fbox{...}` (nested braces
matched), else the text after the last "answer is" up to the end of its line, else the last
number in the response. Score 1.0 when math-verify says the extracted answer equals the record's
`answer`, else 0.0 (also for no answer, a verifier error, or a timeout, which sets
`details["timeout"]=True`). Left out: partial credit, units normalisation beyond math-verify's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rlad_megatron.rewards.base import RewardResult
from rlad_megatron.rewards.verify_pool import VerifyPool, shared_pool

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:\s*/\s*\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with nested braces; None when absent or unclosed."""
    matches = list(_BOX.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i].strip()
    return None


def extract_answer(text: str) -> dict[str, str] | None:
    """{"answer": ..., "method": boxed|answer_is|last_number}, or None when nothing looks like an answer."""
    boxed = last_boxed(text)
    if boxed:
        return {"answer": boxed, "method": "boxed"}
    stated = _ANSWER_IS.findall(text)
    if stated:
        answer = stated[-1].strip().rstrip(".").strip().strip("$").strip()
        if answer:
            return {"answer": answer, "method": "answer_is"}
    numbers = _NUMBER.findall(text)
    if numbers:
        return {"answer": numbers[-1].replace(" ", ""), "method": "last_number"}
    return None


def _as_latex(answer: str) -> str:
    answer = str(answer).strip()
    return answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"


class MathReward:
    """`(response_text, record) -> RewardResult`; `score_batch` verifies a whole batch in parallel."""

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 1, pool: VerifyPool | None = None) -> None:
        self.timeout_s, self.num_workers, self._pool = timeout_s, num_workers, pool

    @property
    def pool(self) -> VerifyPool:
        if self._pool is None:
            self._pool = shared_pool(self.num_workers, self.timeout_s)
        return self._pool

    def __getstate__(self) -> dict[str, Any]:  # pools hold pipes: rebuild one per process
        return {"timeout_s": self.timeout_s, "num_workers": self.num_workers, "_pool": None}

    def __call__(self, response_text: str, record: dict[str, Any]) -> RewardResult:
        return self.score_batch([response_text], [record])[0]

    def score_batch(self, texts: Sequence[str], records: Sequence[dict[str, Any]]) -> list[RewardResult]:
        extracted = [extract_answer(t) for t in texts]
        found_at = {i: e for i, e in enumerate(extracted) if e is not None}
        jobs = list(found_at)
        pairs = [(_as_latex(records[i]["answer"]), f"$\\boxed{{{found_at[i]['answer']}}}$") for i in jobs]
        verdicts = dict(zip(jobs, self.pool.verify_many(pairs)))
        results = []
        for i, found in enumerate(extracted):
            if found is None:
                results.append(RewardResult(0.0, {"correct": False, "extracted": None, "timeout": False}))
                continue
            v = verdicts[i]
            details = {
                "correct": v["equal"],
                "extracted": found["answer"],
                "method": found["method"],
                "timeout": v["timeout"],
            }
            if v.get("error"):
                details["error"] = v["error"]
            results.append(RewardResult(float(v["equal"]), details))
        return results
