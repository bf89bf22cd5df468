"""The record that carries one response through a step (prompt -> rollout -> reward -> teacher -> loss).

Lists of Python numbers, except the teacher's top-k columns (GKD: k ids and k log-probs per response token,
the bulk of a step's data), which are numpy arrays from the teacher's answer on: int32 ids and float32
log-probs of shape [len(response_ids), k] (engines compute them in float32, so nothing is rounded).
`to_dict` / `from_dict` turn them into lists and back for jsonl. The trainer packs everything into tensors.

On trainer ranks other than 0 the per-token columns (`TOKEN_COLUMNS`; hence `Sequence` in the annotations) are
numpy arrays, and only for the samples that rank's data-parallel rank reads (`components.broadcast_samples`);
every other sample holds an `AbsentColumn` in their place: its length (so `len(sample.response_ids)` and every
count built on it work) and nothing else (reading a value raises). `Sample.holds(column)` tells them apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

import numpy as np


@dataclass
class Sample:
    prompt_ids: Sequence[int]
    """Token ids of the templated prompt."""
    record: dict[str, Any] = field(default_factory=dict)
    """The dataset row: prompt, answer and metadata (what the reward function reads)."""
    group_index: int = 0
    """Index of the prompt within the step; the G responses of one prompt share it."""
    response_ids: Sequence[int] = field(default_factory=list)
    """Sampled response tokens (EOS included when generation stopped on it)."""
    rollout_logprobs: Sequence[float] = field(default_factory=list)
    """Engine log-probs of response_ids (temperature-scaled, before top-p/top-k; docs/rollout.md)."""
    finish_reason: str = ""
    """stop, length or abort."""
    response_text: str = ""
    """Decoded response (special tokens skipped)."""
    reward: float = 0.0
    """Scalar reward of the response."""
    reward_details: dict[str, Any] = field(default_factory=dict)
    """What the reward function found (parsed answer, format ok, ...)."""
    teacher_logprobs: Sequence[float] | None = None
    """Teacher log-probs of response_ids, same positions."""
    teacher_topk_ids: np.ndarray | None = None
    """GKD: teacher top-k token ids per response position, int32 [len(response_ids), k]."""
    teacher_topk_logprobs: np.ndarray | None = None
    """GKD: teacher log-probs of teacher_topk_ids, float32 [len(response_ids), k]."""

    @property
    def num_response_tokens(self) -> int:
        return len(self.response_ids)

    def holds(self, column: str) -> bool:
        """Whether this rank holds the values of per-token column `column` (rank 0 always; another trainer rank
        only those its data-parallel rank reads: `components.broadcast_samples`)."""
        return not isinstance(getattr(self, column), AbsentColumn)

    @property
    def ends_with_stop_token(self) -> bool:
        """Whether the final response token is the stop token that ended generation (EOS or any
        rollout.stop_token_ids): the engine stopped on a token (finish_reason 'stop') and, as every engine
        here does, kept it as the last response id. The one rule behind drop_final_eos_from_teacher: teacher
        scoring, the trainer's teacher mask and the OPD / KDRL advantage term all read it."""
        return self.finish_reason == "stop" and len(self.response_ids) > 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in TOPK_FIELDS:
            if out[key] is not None:
                out[key] = np.asarray(out[key]).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        data = dict(data)
        for key, dtype in TOPK_FIELDS.items():
            if data.get(key) is not None:
                data[key] = topk_array(data[key], dtype)
        return cls(**data)


TOPK_FIELDS = {"teacher_topk_ids": np.int32, "teacher_topk_logprobs": np.float32}


def topk_array(rows, dtype) -> np.ndarray:
    """[n, k] array of `dtype` from rows of equal length (an empty list gives shape [0, 0])."""
    array = np.asarray(rows, dtype=dtype)
    return array.reshape(0, 0) if array.size == 0 and array.ndim != 2 else array


TOKEN_COLUMNS: dict[str, type[np.generic]] = {
    "prompt_ids": np.int32,
    "response_ids": np.int32,
    "rollout_logprobs": np.float32,
    "teacher_logprobs": np.float32,
    **TOPK_FIELDS,
}
"""The per-token fields of a Sample and the dtype each travels in between trainer ranks. Exact for the trainer:
token ids fit int32 (checked when packed), and the trainer reads every log-prob as float32."""


class AbsentColumn(Sequence):
    """A per-token column of a sample this rank did not receive (another data-parallel rank trains on it): its
    shape, so `len()` works, and nothing else. Reading a value (index, iterate, `np.asarray`, `torch.as_tensor`)
    raises an error naming the column."""

    __slots__ = ("name", "shape")

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name = name
        self.shape = tuple(int(n) for n in shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> NoReturn:
        raise LookupError(
            f"this rank did not receive {self.name} of this sample: trainer ranks other than 0 get the per-token "
            "columns of only the samples their data-parallel rank trains on (components.broadcast_samples); "
            "read its length with len(), and values only where sample.holds(column)"
        )

    def __array__(self, *args: Any, **kwargs: Any) -> NoReturn:
        self.__getitem__(None)

    def __getstate__(self) -> tuple[str, tuple[int, ...]]:
        return self.name, self.shape

    def __setstate__(self, state: tuple[str, tuple[int, ...]]) -> None:
        self.name, self.shape = state

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AbsentColumn) and (self.name, self.shape) == (other.name, other.shape)

    def __hash__(self) -> int:
        return hash((self.name, self.shape))

    def __repr__(self) -> str:
        return f"AbsentColumn({self.name!r}, {self.shape})"
