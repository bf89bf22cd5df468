"""The engine interface every rollout / teacher backend implements (embedded, HTTP, SGLang fleet).

Log-prob convention (the trainer must use the same one, or the PPO ratio is biased):

* `generate` returns, for every sampled token, log-softmax(logits / temperature) evaluated
  BEFORE top-p / top-k truncation. With temperature == 0 (greedy) it is log-softmax(logits),
  i.e. temperature 1. This is what SGLang's sampler returns by default (it divides the logits
  by the temperature, takes the softmax, samples with top-k/top-p applied to a copy, and reports
  log(probs) of the untruncated softmax); setting SGLANG_RETURN_ORIGINAL_LOGPROB=1 on an SGLang
  server switches it to the temperature-1 distribution, which does NOT match this convention.
* `score` returns temperature-1 log-softmax (the raw model distribution), which is what SGLang
  returns for input (prompt) tokens by default. The teacher is always scored this way.

`score` alignment: logprobs[j] = log p(ids[response_start + j] | ids[:response_start + j]),
i.e. it comes from the logits at position response_start + j - 1 (see teacher/alignment.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

FINISH_REASONS = ("stop", "length", "abort")


class EngineError(RuntimeError):
    """An engine could not serve a request (all servers down, samples lost, bad weights...)."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs, SGLang's names and defaults (top_k=-1 disables top-k)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple = ()
    seed: int | None = None
    """Base seed; sample s of prompt i uses a seed derived from (seed, i, s). None: fresh randomness."""
    ignore_eos: bool = False
    """Do not stop on the model's EOS token(s) (stop_token_ids still stop)."""
    return_routed_experts: bool = False
    """MoE models: also return the experts each token was routed to (`GenerateOutput.routed_experts`). Not a
    sampling knob: over HTTP it is SGLang's top-level `return_routed_experts` request field."""

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if not (self.top_k == -1 or self.top_k >= 1):
            problems.append(f"top_k={self.top_k} must be -1 (off) or >= 1")
        if not self.max_new_tokens >= 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids={list(self.stop_token_ids)} must be non-negative ints")
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class GenerateOutput:
    response_ids: list[int]
    """Sampled tokens; the stop token is included when generation stopped on it."""
    logprobs: list[float]
    """log-softmax(logits / temperature) of each response token, before top-p/top-k (module docstring)."""
    finish_reason: str
    """stop, length or abort."""
    routed_experts: Any = None
    """With `SamplingParams.return_routed_experts`: the top-k expert ids every MoE layer routed each input token
    to, a numpy int16 (int32 past 32767 experts) array [len(prompt) + len(response) - 1, layers, k]: row p is
    the token at position p (the last response token is never fed back, so it has no row), SGLang's layout."""


@dataclass
class ScoreOutput:
    logprobs: list[float]
    """logprobs[j] = log p(ids[response_start + j] | ids[:response_start + j]) at temperature 1."""
    topk_ids: Any = None
    """Per response position, the top-k token ids of the same distribution (when top_k > 0): an int32 numpy
    array [n, k] (rows of ints are accepted too)."""
    topk_logprobs: Any = None
    """Their log-probs, descending: a float32 numpy array [n, k]."""


@dataclass
class WeightsInfo:
    version: int = 0
    path: str = ""
    extra: dict[str, str] = field(default_factory=dict)


OnSample = Callable[[int, int, GenerateOutput], None]
"""Called with (prompt index, sample index, output) as each generated sample finishes."""


@runtime_checkable
class Engine(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, n: int = 1, on_sample: OnSample | None = None
    ) -> list[list[GenerateOutput]]:
        """n samples per prompt: result[i][s] is sample s of prompt i. `on_sample(i, s, output)`, when given, is
        called once per sample as soon as it finishes (from the engine's own thread: it must return quickly)."""

    def score(self, ids: list[list[int]], response_start: list[int], top_k: int = 0) -> list[ScoreOutput]:
        """Log-probs of ids[i][response_start[i]:] given their prefix (temperature 1)."""

    def update_weights(self, *, named_tensors=None, path: str | None = None, version: int) -> None:
        """Load new weights: HF-named tensors in-process, or an HF folder on disk."""

    def health(self) -> bool:
        """True when the engine can serve."""

    def close(self) -> None:
        """Release servers, threads and memory."""


def sample_seed(seed: int | None, prompt_index: int, sample_index: int) -> int | None:
    """The per-sample seed derived from a base seed, identical across engines and servers.

    Deriving it per (prompt, sample) rather than per request makes a retried or failed-over sample
    draw the same tokens on any server, and keeps samples of one prompt distinct.
    """
    if seed is None:
        return None
    return (int(seed) * 1_000_003 + prompt_index * 65_537 + sample_index) % (2**31 - 1)


def check_prompts(prompt_ids: list[list[int]], vocab_size: int | None = None) -> None:
    """Raise ValueError naming the first malformed prompt (empty, non-int, out of vocabulary).

    The common all-valid case is checked in bulk; the slow loop only runs to name the culprit.
    """
    if not isinstance(prompt_ids, list) or not prompt_ids:
        raise ValueError("prompt_ids must be a non-empty list of token-id lists")
    if all(isinstance(ids, (list, tuple)) and ids for ids in prompt_ids):
        flat = list(itertools.chain.from_iterable(prompt_ids))
        if set(map(type, flat)) == {int} and min(flat) >= 0 and (vocab_size is None or max(flat) < vocab_size):
            return
    for i, ids in enumerate(prompt_ids):
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"prompt {i} is empty or not a list of token ids")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                limit = f" < vocab_size={vocab_size}" if vocab_size is not None else ""
                raise ValueError(f"prompt {i} has token id {t!r}; ids must be ints >= 0{limit}")
