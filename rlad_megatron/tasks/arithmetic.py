"""Two scratchpad arithmetic tasks small enough for a ~0.1-1M-parameter char model on CPU.

`addition` ("47+85="): the trace adds column by column from the right, writing each column sum
with the incoming carry, then the answer after `#`:
    7+5=12 4+8+1=13 #132
`multiplication` by one digit ("47*6="): the same scheme with products and carries:
    7*6=42 4*6+4=28 #282
Difficulty = number of digits of the (first) operand. Traces stay under ~60 characters up to
4 digits. Reward (`task:addition`, `task:multiplication`): 1.0 when the number after the last
`#` equals the answer, else 0.0, plus `format_weight` (default 0) when the response is a
well-formed trace. Left out: subtraction, long multiplication (traces grow quadratically).
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

from rlad_megatron.rewards.base import RewardResult
from rlad_megatron.tasks.base import Task

_FINAL = re.compile(r"#\s*(-?\d+)")
_STEP_ADD = r"\d\+\d(?:\+1)?=\d{1,2}"
_STEP_MUL = r"\d\*\d(?:\+\d)?=\d{1,2}"


def parse_final_answer(text: str) -> str | None:
    """The integer after the LAST `#` in the response, as a string without leading zeros."""
    found = _FINAL.findall(text)
    return str(int(found[-1])) if found else None


def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _operand(rng: random.Random, num_digits: int) -> int:
    if num_digits < 1:
        raise ValueError(f"difficulty (number of digits) must be >= 1, got {num_digits}")
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return rng.randint(low, 10**num_digits - 1)


class _ArithmeticTask(Task):
    alphabet = string.digits + "+*=# "
    default_difficulties = (1, 2, 3)
    symbol = "+"
    step_pattern = _STEP_ADD

    def operands(self, rng: random.Random, difficulty: int) -> tuple[int, int]:
        raise NotImplementedError

    def compute(self, a: int, b: int) -> int:
        raise NotImplementedError

    def draw(self, rng: random.Random, difficulty: int) -> dict[str, Any]:
        a, b = self.operands(rng, difficulty)
        return {
            "prompt": f"{a}{self.symbol}{b}=",
            "answer": str(self.compute(a, b)),
            "metadata": {"task": self.name, "difficulty": difficulty},
        }

    def reward(self, response_text: str, record: dict[str, Any], format_weight: float = 0.0, **_: Any) -> RewardResult:
        parsed = parse_final_answer(response_text)
        correct = parsed is not None and parsed == str(record["answer"]).strip()
        well_formed = re.fullmatch(rf"\s*(?:{self.step_pattern} )+#\d+\s*", response_text) is not None
        score = float(correct) + (format_weight if well_formed else 0.0)
        return RewardResult(score, {"correct": correct, "parsed": parsed, "format_ok": well_formed})

    @staticmethod
    def operands_of(record: dict[str, Any], symbol: str) -> tuple[int, int]:
        left, right = record["prompt"].rstrip("=").split(symbol)
        return int(left), int(right)


class AdditionTask(_ArithmeticTask):
    name = "addition"
    symbol = "+"
    step_pattern = _STEP_ADD

    def operands(self, rng: random.Random, difficulty: int) -> tuple[int, int]:
        return _operand(rng, difficulty), _operand(rng, difficulty)

    def compute(self, a: int, b: int) -> int:
        return a + b

    def solution_trace(self, record: dict[str, Any]) -> str:
        a, b = self.operands_of(record, "+")
        da, db = _digits(a), _digits(b)
        width = max(len(da), len(db))
        da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
        steps, carry = [], 0
        for x, y in zip(da, db):
            total = x + y + carry
            steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={total}")
            carry = total // 10
        return " ".join(steps) + f" #{a + b}"


class MultiplicationTask(_ArithmeticTask):
    """Multi-digit times one digit."""

    name = "multiplication"
    symbol = "*"
    step_pattern = _STEP_MUL

    def operands(self, rng: random.Random, difficulty: int) -> tuple[int, int]:
        return _operand(rng, difficulty), rng.randint(2, 9)

    def compute(self, a: int, b: int) -> int:
        return a * b

    def solution_trace(self, record: dict[str, Any]) -> str:
        a, m = self.operands_of(record, "*")
        steps, carry = [], 0
        for x in _digits(a):
            total = x * m + carry
            steps.append(f"{x}*{m}" + (f"+{carry}" if carry else "") + f"={total}")
            carry = total // 10
        return " ".join(steps) + f" #{a * m}"
