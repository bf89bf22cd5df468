"""The reward contract: a pure function `(response_text, record) -> RewardResult`.

`record` is the dataset row carried by a `Sample` (`prompt`, `answer`, `metadata`). Every
reward function sets `details["correct"]` (bool: the final answer is right), which evaluation
uses for avg@k / pass@k, independently of how the scalar `score` is shaped.

Pure module: stdlib only, so tasks and workers can import it cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


@dataclass
class RewardResult:
    score: float
    """Scalar reward of the response."""
    details: dict[str, Any] = field(default_factory=dict)
    """What the function found; always holds `correct` (bool)."""

    @property
    def correct(self) -> bool:
        return bool(self.details.get("correct", False))


RewardFn = Callable[[str, dict[str, Any]], RewardResult]


def answer_tag(text: str) -> str | None:
    """Content of the LAST `<answer>...</answer>` block, stripped; None when there is none."""
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def final_line(text: str) -> str:
    """The last non-empty line of `text`, stripped ('' for blank text)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
