"""The record that carries one response through a step (prompt -> rollout -> reward -> teacher -> loss).

Lists of Python numbers rather than tensors, so samples can cross process and HTTP
boundaries, be saved to jsonl and replayed. The trainer packs them into tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Sample:
    prompt_ids: list[int]
    """Token ids of the templated prompt."""
    record: dict[str, Any] = field(default_factory=dict)
    """The dataset row: prompt, answer and metadata (what the reward function reads)."""
    group_index: int = 0
    """Index of the prompt within the step; the G responses of one prompt share it."""
    response_ids: list[int] = field(default_factory=list)
    """Sampled response tokens (EOS included when generation stopped on it)."""
    rollout_logprobs: list[float] = field(default_factory=list)
    """Engine log-probs of response_ids (temperature-scaled, before top-p/top-k; docs/rollout.md)."""
    finish_reason: str = ""
    """stop, length or abort."""
    response_text: str = ""
    """Decoded response (special tokens skipped)."""
    reward: float = 0.0
    """Scalar reward of the response."""
    reward_details: dict[str, Any] = field(default_factory=dict)
    """What the reward function found (parsed answer, format ok, ...)."""
    teacher_logprobs: list[float] | None = None
    """Teacher log-probs of response_ids, same positions."""
    teacher_topk_ids: list[list[int]] | None = None
    """GKD: teacher top-k token ids per response position."""
    teacher_topk_logprobs: list[list[float]] | None = None
    """GKD: teacher log-probs of teacher_topk_ids."""

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    @property
    def ends_with_stop_token(self) -> bool:
        """Whether the final response token is the stop token that ended generation (EOS or any
        rollout.stop_token_ids): the engine stopped on a token (finish_reason 'stop') and, as every engine
        here does, kept it as the last response id. The one rule behind drop_final_eos_from_teacher: teacher
        scoring, the trainer's teacher mask and the OPD / KDRL advantage term all read it."""
        return self.finish_reason == "stop" and bool(self.response_ids)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        return cls(**data)
