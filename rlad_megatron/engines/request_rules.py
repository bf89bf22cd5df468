"""SGLang 0.5.23's request rules at the edges, in one place for the embedded engine, `rlad serve` and the client.

Each function is one rule of SGLang's `/generate` path (docs/rollout.md lists them with their source), so the
in-process engine and the HTTP servers answer the same request the same way:

* prompt length: the tokenizer manager refuses an input of `context_len` tokens or more, then the scheduler
  refuses one of `max_req_input_len = (context_len - 1) - 5` tokens or more; `--allow-auto-truncate` cuts the
  input to those lengths instead (`prompt_length`);
* total length: the tokenizer manager refuses `len(input) + max_new_tokens > context_len` (with
  `--allow-auto-truncate` it lowers max_new_tokens to `context_len - len(input)`), then the scheduler caps
  it at `max_req_len - len(input) - 1` with `max_req_len = context_len - 1` (`admitted_max_new_tokens`,
  `scheduled_max_new_tokens`); a client that wants the longest response the context leaves asks for
  `fit_max_new_tokens`, which passes both;
* log-prob start: ignored without return_logprob; -1 means "output tokens only" (start = len(input), no input
  entries); above len(input) the request is refused (`logprob_start`);
* stops: with ignore_eos no token ends a sequence (neither EOS nor stop_token_ids); otherwise the first
  generated stop_token_ids / EOS token ends it, is kept as the last token of output_ids and of the output
  log-probs, and beats the length limit on the same step (`stop_tokens`).
"""

from __future__ import annotations

# the scheduler keeps five tokens of headroom below max_req_len = context_len - 1 (tp_worker.py)
SCHEDULER_INPUT_MARGIN = 5


class RuleError(ValueError):
    """A request SGLang refuses; the message is SGLang's own (its /generate answers 400 with it)."""


def max_req_len(context_len: int) -> int:
    return context_len - 1


def max_req_input_len(context_len: int) -> int:
    return max_req_len(context_len) - SCHEDULER_INPUT_MARGIN


def check_not_empty(num_input: int) -> None:
    if num_input == 0:
        raise RuleError("input_ids cannot be empty.")


def tokenizer_input_length(num_input: int, context_len: int, allow_auto_truncate: bool = False) -> int:
    """The tokenizer manager's input check (_validate_one_request): the prompt length it passes on."""
    check_not_empty(num_input)
    if num_input < context_len:
        return num_input
    if allow_auto_truncate:
        return context_len
    raise RuleError(f"The input ({num_input} tokens) is longer than the model's context length ({context_len} tokens).")


def scheduler_input_length(num_input: int, context_len: int, allow_auto_truncate: bool = False) -> int:
    """The scheduler's input check (validate_input_length against max_req_input_len)."""
    limit = max_req_input_len(context_len)
    if num_input < limit:
        return num_input
    if allow_auto_truncate:
        return limit
    raise RuleError(
        f"Input length ({num_input} tokens) exceeds the maximum allowed length ({limit} tokens). "
        "Use a shorter input or enable --allow-auto-truncate."
    )


def prompt_length(num_input: int, context_len: int, allow_auto_truncate: bool = False) -> int:
    """Both input checks: the prompt length SGLang runs, or RuleError naming the limit."""
    n = tokenizer_input_length(num_input, context_len, allow_auto_truncate)
    return scheduler_input_length(n, context_len, allow_auto_truncate)


def admitted_max_new_tokens(
    num_input: int, max_new_tokens: int, context_len: int, allow_auto_truncate: bool = False
) -> int:
    """The tokenizer manager's total-length check: max_new_tokens as admitted, or RuleError."""
    if max_new_tokens + num_input <= context_len:
        return max_new_tokens
    if allow_auto_truncate:
        return max(0, context_len - num_input)
    raise RuleError(
        f"Requested token count exceeds the model's maximum context length of {context_len} tokens. "
        f"You requested a total of {max_new_tokens + num_input} tokens: {num_input} tokens from the input "
        f"messages and {max_new_tokens} tokens for the completion. Please reduce the number of tokens in the "
        "input messages or the completion to fit within the limit."
    )


def scheduled_max_new_tokens(num_input: int, max_new_tokens: int, context_len: int) -> int:
    """The scheduler's silent cap (init_req_max_new_tokens): what is actually generated at most."""
    return max(0, min(max_new_tokens, max_req_len(context_len) - num_input - 1))


def fit_max_new_tokens(num_input: int, max_new_tokens: int, context_len: int) -> int:
    """The longest budget up to max_new_tokens that SGLang accepts and runs in full: min(m, context - input - 2)."""
    return scheduled_max_new_tokens(num_input, max_new_tokens, context_len)


def logprob_start(return_logprob: bool, logprob_start_len: int, num_input: int) -> int:
    """The first input position with a returned log-prob entry (num_input: none), or RuleError."""
    if not return_logprob or logprob_start_len == -1:
        return num_input
    if logprob_start_len > num_input:
        raise RuleError(
            f"req.logprob_start_len={logprob_start_len} is higher than the number of input tokens "
            f"len(req.origin_input_ids)={num_input}. Please use a smaller logprob_start_len."
        )
    return logprob_start_len


def stop_tokens(stop_token_ids, eos_token_ids, ignore_eos: bool) -> tuple[int, ...]:
    """The token ids that end a sequence: none with ignore_eos, else stop_token_ids then the EOS ids."""
    if ignore_eos:
        return ()
    return tuple(dict.fromkeys([*stop_token_ids, *eos_token_ids]))
