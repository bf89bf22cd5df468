"""Knights-and-Knaves reward with a format component, following the Logic-RL recipe.

Format: the response must hold one `<think>...</think>` followed by one `<answer>...</answer>`
(only the answer block when `require_think=False`): +format_correct (1) else format_wrong (-1).
Answer (only scored when the format is right, as in Logic-RL; otherwise the answer term is 0):
every person of the gold solution must be claimed in the answer block as "<Name> is a(n) <role>"
(the last claim per name counts). All roles equal the gold's: +answer_correct (2); any differs:
answer_wrong (-1.5); some person unclaimed: answer_unparseable (-2).

Gold: the record's `answer` as text ("Zoey is a knight, and Oliver is a knave.", as
reasoning-gym writes it) or a mapping {name: role}. Role words are compared as written
(knight/knave, hero/villain, ...), case-insensitive, so any term pair works.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rlad_megatron.rewards.base import RewardResult

_CLAIM = re.compile(r"\b([A-Z][\w'-]*)\s+is\s+(?:a|an)\s+([A-Za-z]+)")
_THINK_ANSWER = re.compile(r"^\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*$", re.DOTALL)
_ANSWER_ONLY = re.compile(r"^(.*?)<answer>(.*?)</answer>\s*$", re.DOTALL)


def parse_roles(text: str) -> dict[str, str]:
    """{name: role} from every "<Name> is a(n) <role>" in text; later claims override earlier ones."""
    return {name: role.lower() for name, role in _CLAIM.findall(text)}


def gold_roles(answer: Any) -> dict[str, str]:
    if isinstance(answer, Mapping):
        return {str(k): str(v).lower() for k, v in answer.items()}
    roles = parse_roles(str(answer))
    if not roles:
        raise ValueError(
            f"cannot read a Knights-and-Knaves solution from answer {answer!r}; write 'Name is a role, ...'"
        )
    return roles


def split_format(text: str, require_think: bool = True) -> str | None:
    """The answer block when the response is well formed, else None."""
    if text.count("<answer>") != 1 or text.count("</answer>") != 1:
        return None
    if require_think:
        if text.count("<think>") != 1 or text.count("</think>") != 1:
            return None
        m = _THINK_ANSWER.match(text)
        return m.group(2) if m else None
    m = _ANSWER_ONLY.match(text)
    return m.group(2) if m and "<think>" not in m.group(2) else None


class KnightsKnavesReward:
    def __init__(
        self,
        format_correct: float = 1.0,
        format_wrong: float = -1.0,
        answer_correct: float = 2.0,
        answer_wrong: float = -1.5,
        answer_unparseable: float = -2.0,
        require_think: bool = True,
    ) -> None:
        self.scores = {
            "format_correct": format_correct,
            "format_wrong": format_wrong,
            "answer_correct": answer_correct,
            "answer_wrong": answer_wrong,
            "answer_unparseable": answer_unparseable,
        }
        self.require_think = require_think

    def __call__(self, response_text: str, record: dict[str, Any]) -> RewardResult:
        gold = gold_roles(record["answer"])
        block = split_format(response_text, self.require_think)
        s = self.scores
        if block is None:
            return RewardResult(s["format_wrong"], {"correct": False, "format_ok": False, "status": "format"})
        claimed = parse_roles(block)
        predicted = {name: claimed.get(name) for name in gold}
        if any(role is None for role in predicted.values()):
            status, answer_score = "unparseable", s["answer_unparseable"]
        elif predicted == gold:
            status, answer_score = "correct", s["answer_correct"]
        else:
            status, answer_score = "wrong", s["answer_wrong"]
        details = {"correct": status == "correct", "format_ok": True, "status": status, "predicted": predicted}
        return RewardResult(s["format_correct"] + answer_score, details)
