"""The record that carries one response through a step (prompt -> rollout -> reward -> teacher -> loss).

Lists of Python numbers, except the teacher's top-k columns (GKD: k ids and k log-probs per response token,
the bulk of a step's data), which are numpy arrays from the teacher's answer on: int32 ids and float32
log-probs of shape [len(response_ids), k] (engines compute them in float32, so nothing is rounded).
`to_dict` / `from_dict` turn them into lists and back for jsonl. The trainer packs everything into tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


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
    teacher_topk_ids: np.ndarray | None = None
    """GKD: teacher top-k token ids per response position, int32 [len(response_ids), k]."""
    teacher_topk_logprobs: np.ndarray | None = None
    """GKD: teacher log-probs of teacher_topk_ids, float32 [len(response_ids), k]."""
    routed_experts: np.ndarray | None = None
    """MoE routing replay (model.routing_replay): the top-k experts the rollout engine routed every fed token
    to, int16 (int32 past 32767 experts) [len(prompt_ids) + len(response_ids) - 1, layers, k]; row p is the
    token at position p of prompt + response (the last response token is never fed, so it has no row)."""

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
        out = asdict(self)
        for key in (*TOPK_FIELDS, "routed_experts"):
            if out[key] is not None:
                out[key] = np.asarray(out[key]).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        for key, dtype in TOPK_FIELDS.items():
            if data.get(key) is not None:
                data[key] = topk_array(data[key], dtype)
        if data.get("routed_experts") is not None:
            data["routed_experts"] = routed_experts_array(data["routed_experts"])
        return cls(**data)


TOPK_FIELDS = {"teacher_topk_ids": np.int32, "teacher_topk_logprobs": np.float32}


def routed_experts_array(rows) -> np.ndarray:
    """[tokens, layers, k] int16 array (int32 when an id exceeds int16) from nested lists or an array."""
    array = np.asarray(rows)
    if array.ndim != 3:
        raise ValueError(f"routed_experts must be [tokens, layers, k]; got shape {array.shape}")
    dtype = np.int16 if array.size == 0 or array.max() <= np.iinfo(np.int16).max else np.int32
    return array.astype(dtype, copy=False)


def topk_array(rows, dtype) -> np.ndarray:
    """[n, k] array of `dtype` from rows of equal length (an empty list gives shape [0, 0])."""
    array = np.asarray(rows, dtype=dtype)
    return array.reshape(0, 0) if array.size == 0 and array.ndim != 2 else array
