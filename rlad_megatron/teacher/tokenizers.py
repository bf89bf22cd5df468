"""Refuse teacher/student pairs whose tokenizers map text to different ids.

Teacher log-probs are computed on the student's token ids; that is only meaningful when both
tokenizers give every token the same id. The check compares the full token -> id maps and the
special-token ids, and names the first differences.
"""

from __future__ import annotations


def _vocab(model_dir: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {model_dir!r}: {err}") from err
    return tok, tok.get_vocab()


def vocab_differences(student: dict[str, int], teacher: dict[str, int], limit: int = 5) -> list[str]:
    """Human-readable differences between two token -> id maps (empty when identical)."""
    diffs = []
    for tok in sorted(set(student) | set(teacher), key=lambda t: (student.get(t, teacher.get(t, -1)), t)):
        a, b = student.get(tok), teacher.get(tok)
        if a != b:
            diffs.append(f"{tok!r}: student id {a}, teacher id {b}")
            if len(diffs) >= limit:
                break
    return diffs


def check_same_tokenizer(student_dir: str, teacher_dir: str) -> None:
    """Raise ValueError when the student's and teacher's tokenizers differ in any token id."""
    s_tok, s_vocab = _vocab(student_dir)
    t_tok, t_vocab = _vocab(teacher_dir)
    diffs = vocab_differences(s_vocab, t_vocab)
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(s_tok, name, None), getattr(t_tok, name, None)
        if a is not None and b is not None and a != b:
            diffs.append(f"{name}: student {a}, teacher {b}")
    if diffs:
        n = sum(1 for t in set(s_vocab) | set(t_vocab) if s_vocab.get(t) != t_vocab.get(t))
        raise ValueError(
            f"student ({student_dir}) and teacher ({teacher_dir}) tokenizers differ ({n} tokens map to different ids; "
            f"e.g. {'; '.join(diffs)}). Teacher log-probs are computed on the student's token ids, so both models "
            "must share one tokenizer: pick a teacher from the same family or retokenize."
        )
