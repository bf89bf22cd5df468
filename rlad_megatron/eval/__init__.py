"""Evaluation: avg@k / pass@k through the Engine interface (`evaluate`), reports, `rlad eval`."""

from __future__ import annotations

from rlad_megatron.eval.evaluate import evaluate, markdown_table, write_report
from rlad_megatron.eval.metrics import pass_at_k

__all__ = ["evaluate", "markdown_table", "pass_at_k", "write_report"]
