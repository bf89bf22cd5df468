"""What every procedural task provides, and the hash-based train / held-out split.

A task turns (seed, split, difficulty) into records `{"prompt", "answer", "metadata"}`, writes
the step-by-step `solution_trace(record)` a teacher would produce (for SFT of the demo's
teacher and student), and scores a response with `reward(response_text, record)`.

Held-out splits never overlap training: a problem belongs to the `test` split iff a hash of its
canonical key falls below `heldout_fraction`, so the split depends on the problem only (not on
the seed, the order of generation or the dataset size). Generation draws problems and keeps
only those of the requested split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from rlad_megatron.rewards.base import RewardResult

SPLITS = ("train", "test")


def split_of(key: str, heldout_fraction: float) -> str:
    """'test' when the problem's hash lands in the held-out fraction, else 'train'."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction else "train"


class Task:
    """Base class: subclasses define `draw`, `key`, `solution_trace`, `reward` and `alphabet`."""

    name: str = ""
    alphabet: str = ""
    """Every character prompts, traces and answers of this task can contain."""
    default_difficulties: Sequence[int] = (1, 2, 3)

    def draw(self, rng: random.Random, difficulty: int) -> dict[str, Any]:
        raise NotImplementedError

    def solution_trace(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    def reward(self, response_text: str, record: dict[str, Any], **kwargs: Any) -> RewardResult:
        raise NotImplementedError

    def generate(
        self,
        size: int,
        *,
        seed: int = 0,
        split: str = "train",
        difficulties: Sequence[int] | None = None,
        heldout_fraction: float = 0.1,
    ) -> list[dict[str, Any]]:
        """`size` records of `split`, difficulties cycled in order; same arguments -> same records."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not allowed; choose one of {list(SPLITS)}")
        if not 0.0 < heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={heldout_fraction} must be in (0, 1)")
        levels = list(difficulties or self.default_difficulties)
        rng = random.Random(f"{self.name}:{seed}:{split}")
        records: list[dict[str, Any]] = []
        for i in range(size):
            records.append(self._draw_in_split(rng, levels[i % len(levels)], split, heldout_fraction))
        return records

    def _draw_in_split(self, rng: random.Random, level: int, split: str, fraction: float) -> dict[str, Any]:
        for _ in range(10_000):
            record = self.draw(rng, level)
            if split_of(f"{self.name}:{record['prompt']}", fraction) == split:
                return record
        raise ValueError(f"task {self.name}: difficulty {level} has no {split} problems (heldout_fraction={fraction})")
