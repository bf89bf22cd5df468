"""reasoning-gym rewards: the task's own `score_answer(answer, entry)`.

Answer extraction: the content of the last `<answer>...</answer>` block when the response has
one, else the response's last non-empty line. The entry is regenerated from the record's
`metadata["reasoning_gym"]` (task, seed, size, config, index) when present, so the score is
exactly reasoning-gym's on the entry the prompt came from; records from files are scored against
`{"question": prompt, "answer": answer, "metadata": metadata}`. `correct` means score >= 1.0
(some tasks give partial credit, e.g. countdown gives 0.01 for any non-empty wrong answer).
"""

from __future__ import annotations

from typing import Any

from rlad_megatron.rewards.base import RewardResult, answer_tag, final_line


def extract_rg_answer(text: str) -> str:
    tagged = answer_tag(text)
    return tagged if tagged is not None else final_line(text)


class ReasoningGymReward:
    def __init__(self, task: str, config: dict[str, Any] | None = None) -> None:
        self.task, self.config = task, dict(config or {})

    def _scorer_and_entry(self, record: dict[str, Any]):
        from rlad_megatron.tasks.reasoning_gym_tasks import dataset_for, entry_for

        entry = entry_for(record)
        if entry is not None:  # entry_for found the record's own reasoning-gym spec
            return dataset_for(record["metadata"]["reasoning_gym"]), entry
        # Records from a file: a small dataset of the same task provides score_answer.
        dataset = dataset_for({"task": self.task, "seed": 0, "size": 1, "config": self.config})
        entry = {
            "question": record.get("prompt", ""),
            "answer": record.get("answer"),
            "metadata": record.get("metadata") or {},
        }
        return dataset, entry

    def __call__(self, response_text: str, record: dict[str, Any]) -> RewardResult:
        dataset, entry = self._scorer_and_entry(record)
        answer = extract_rg_answer(response_text)
        score = float(dataset.score_answer(answer or None, entry))
        return RewardResult(score, {"correct": score >= 1.0, "extracted": answer})
