"""Teacher scoring: log-probs (and top-k) of the student's exact tokens, the alignment helpers,
and the tokenizer-compatibility check."""

from rlad_megatron.teacher.scoring import score_samples
from rlad_megatron.teacher.tokenizers import check_same_tokenizer

__all__ = ["check_same_tokenizer", "score_samples"]
