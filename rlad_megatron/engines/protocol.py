"""The subset of SGLang's native HTTP API the project speaks: request parsing and response shapes.

Pure functions (no torch, no I/O) shared by the embedded server and the HTTP client, so the
same field names and shapes are used on both sides and the parser can be fuzzed directly.

Field mapping (SGLang `GenerateReqInput` / `SamplingParams`, `meta_info` built by the tokenizer
manager):
  request   input_ids (one list or a batch) or text (one string or a list, tokenized with the served
            model's tokenizer as SGLang does), sampling_params (dict or one per prompt) with
            temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=128, stop_token_ids, n=1,
            sampling_seed, ignore_eos=False; return_logprob=False; logprob_start_len=-1
            (-1: output tokens only); top_logprobs_num=0; rid. The edge rules (context length,
            max_new_tokens caps, logprob_start_len, stops) are engines/request_rules.py.
  response  {"text", "output_ids", "meta_info": {"id", "finish_reason": {"type": "stop"|"length"|
            "abort", "matched"|"length"|"message"}, "prompt_tokens", "completion_tokens",
            "cached_tokens", "weight_version", "e2e_latency", and with return_logprob:
            "input_token_logprobs", "output_token_logprobs" as [logprob, token_id, text|None]
            triples, "input_top_logprobs" / "output_top_logprobs" (lists of triples per position)
            when top_logprobs_num > 0; with return_routed_experts (MoE models): "routed_experts", base64 of
            int32 [len(input) + len(output) - 1 - routed_experts_start_len, layers, k], the experts every
            fed token was routed to}}. The first input entry has logprob None (SGLang pads it).
  batch     with n > 1 SGLang repeats the whole batch n times: output k is prompt k % B, sample k // B.
Errors are 4xx with {"error": {"message": ...}}, SGLang's shape. Unsupported SGLang features
(stop strings, penalties, min_p, streaming, LoRA) are refused by name, never ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlad_megatron.engines import request_rules

TOP_LEVEL_KEYS = {
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "rid",
    "stream",
    "return_text_in_logprobs",
    "text",
    "lora_path",
    "custom_logit_processor",
    "token_ids_logprob",
    "image_data",
    "model",
    "log_metrics",
    "no_logs",
    "return_hidden_states",
    "background",
    "return_bytes",
    "return_entropy",
    "return_routed_experts",
    "routed_experts_start_len",
}
# GenerateReqInput fields sglang-router fills in with their defaults: accepted only while they are off
MUST_BE_OFF = ("stream", "return_hidden_states", "background", "return_bytes", "return_entropy")
SAMPLING_KEYS = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_new_tokens",
    "stop_token_ids",
    "n",
    "sampling_seed",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "stop",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "min_new_tokens",
}
MAX_N = 64
MAX_STOP_IDS = 32
MAX_TOP_LOGPROBS = 64
MAX_TEMPERATURE = 100.0


class RequestError(ValueError):
    """A malformed or unsupported request; the message is returned to the client with a 4xx status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class GenRequest:
    """One prompt of a /generate call, validated."""

    input_ids: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    ignore_eos: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    """As sent; after parse_generate, the first input position with a log-prob entry (len(input_ids): none)."""
    top_logprobs_num: int = 0
    rid: str | None = None
    max_new_tokens_given: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise RequestError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def _float(value: Any, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        raise RequestError(f"{name}={value} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}")
    return value


def _token_list(value: Any, name: str, vocab_size: int, allow_empty: bool = False) -> list[int]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise RequestError(f"{name} must be a non-empty list of token ids")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise RequestError(f"{name} contains {t!r}; token ids must be integers in [0, {vocab_size})")
    return value


def _sampling(sp: Any, req: GenRequest, vocab_size: int) -> None:
    if sp is None:
        sp = {}
    if not isinstance(sp, dict):
        raise RequestError("sampling_params must be an object (or a list of objects, one per prompt)")
    unknown = sorted(set(sp) - SAMPLING_KEYS)
    if unknown:
        raise RequestError(f"unknown sampling_params {unknown}; supported: {sorted(SAMPLING_KEYS)}")
    _refuse_unsupported(sp)
    if sp.get("temperature") is not None:
        req.temperature = _float(sp["temperature"], "temperature", 0.0, MAX_TEMPERATURE)
    if sp.get("top_p") is not None:
        req.top_p = _float(sp["top_p"], "top_p", 0.0, 1.0, lo_open=True)
    if sp.get("top_k") is not None:
        req.top_k = _int(sp["top_k"], "top_k", -1, 1 << 30)
        if req.top_k == 0:
            raise RequestError("top_k=0 is invalid: use -1 to disable top-k or a value >= 1")
    if sp.get("max_new_tokens") is not None:
        req.max_new_tokens = _int(sp["max_new_tokens"], "max_new_tokens", 0, 1 << 30)
        req.max_new_tokens_given = True
    if sp.get("stop_token_ids") is not None:
        req.stop_token_ids = _token_list(sp["stop_token_ids"], "stop_token_ids", vocab_size, allow_empty=True)
        if len(req.stop_token_ids) > MAX_STOP_IDS:
            raise RequestError(f"stop_token_ids has {len(req.stop_token_ids)} entries; at most {MAX_STOP_IDS}")
    if sp.get("n") is not None:
        req.n = _int(sp["n"], "n", 1, MAX_N)
    if sp.get("sampling_seed") is not None:
        req.seed = _int(sp["sampling_seed"], "sampling_seed", 0, 2**63 - 1)
    if sp.get("ignore_eos") is not None:
        req.ignore_eos = _bool(sp["ignore_eos"], "ignore_eos")


def _refuse_unsupported(sp: dict[str, Any]) -> None:
    neutral = {
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "min_new_tokens": 0,
    }
    for key, ok in neutral.items():
        if sp.get(key) is not None and sp[key] != ok:
            raise RequestError(f"sampling_params.{key}={sp[key]!r} is not supported by this server (only {ok})")
    if sp.get("stop"):
        raise RequestError("sampling_params.stop (stop strings) is not supported; use stop_token_ids")


def parse_generate(
    body: Any,
    vocab_size: int,
    max_context: int,
    max_prompts: int = 4096,
    tokenizer=None,
    allow_auto_truncate: bool = False,
) -> list[GenRequest]:
    """Validate a /generate JSON body; return one GenRequest per prompt (n kept per request).

    `text` prompts need `tokenizer` (the served model's); SGLang's edge rules are applied in its order
    (engines/request_rules.py): input length, total length, the scheduler's cap, log-prob start."""
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    unknown = sorted(set(body) - TOP_LEVEL_KEYS)
    if unknown:
        raise RequestError(f"unknown fields {unknown}")
    for key in ("image_data", "lora_path", "custom_logit_processor", "token_ids_logprob"):
        if body.get(key) is not None:
            raise RequestError(f"{key!r} is not supported by this server; send token ids in input_ids or text")
    for key in MUST_BE_OFF:
        if body.get(key):
            raise RequestError(f"{key}=true is not supported by this server")
    single, prompts = _prompts(body, vocab_size, tokenizer)
    if len(prompts) > max_prompts:
        raise RequestError(f"batch of {len(prompts)} prompts exceeds the limit {max_prompts}", status=413)
    sps = body.get("sampling_params")
    if isinstance(sps, list):
        if single or len(sps) != len(prompts):
            raise RequestError(f"sampling_params list has {len(sps)} entries for {len(prompts)} prompts")
    else:
        sps = [sps] * len(prompts)
    reqs = []
    for i, (p, sp) in enumerate(zip(prompts, sps)):
        req = GenRequest(list(p))
        _sampling(sp, req, vocab_size)
        _logprob_fields(body, req, vocab_size, i, len(prompts), single)
        _routed_experts_fields(body, req)
        _apply_rules(req, max_context, allow_auto_truncate)
        reqs.append(req)
    if len({r.n for r in reqs}) > 1:
        raise RequestError("all prompts of a batch must use the same n (as in SGLang)")
    if sum(r.n for r in reqs) > max_prompts:
        raise RequestError(f"{sum(r.n for r in reqs)} samples exceed the per-request limit {max_prompts}", status=413)
    return reqs


def _routed_experts_fields(body: dict[str, Any], req: GenRequest) -> None:
    """SGLang's return_routed_experts / routed_experts_start_len (in [0, prompt tokens], as its scheduler checks)."""
    if body.get("return_routed_experts") is not None:
        req.return_routed_experts = _bool(body["return_routed_experts"], "return_routed_experts")
    if body.get("routed_experts_start_len") is not None:
        req.routed_experts_start_len = _int(
            body["routed_experts_start_len"], "routed_experts_start_len", 0, len(req.input_ids)
        )


def _prompts(body: dict[str, Any], vocab_size: int, tokenizer) -> tuple[bool, list[list[int]]]:
    """(single, token-id prompts) from input_ids, or from text tokenized as SGLang's tokenizer manager does."""
    text, ids = body.get("text"), body.get("input_ids")
    if text is not None and ids is not None:
        raise RequestError("give either text or input_ids, not both")
    if text is not None:
        if tokenizer is None:
            raise RequestError(
                "text prompts need the model's tokenizer, and this server has none (a model folder without "
                "tokenizer files, or --skip-tokenizer-init); send input_ids"
            )
        single = isinstance(text, str)
        texts = [text] if single else text
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise RequestError("text must be a string or a non-empty list of strings")
        prompts = [list(map(int, t)) for t in tokenizer(texts)["input_ids"]]
        for i, p in enumerate(prompts):
            if not p:
                raise RequestError(f"text{'' if single else f'[{i}]'} has no tokens; the prompt cannot be empty")
        return single, prompts
    if ids == []:
        raise RequestError("input_ids cannot be empty.")
    if not isinstance(ids, list):
        raise RequestError("input_ids must be a non-empty list of token ids, or a non-empty list of such lists")
    single = not isinstance(ids[0], list)
    prompts = [ids] if single else ids
    for i, p in enumerate(prompts):
        name = "input_ids" if single else f"input_ids[{i}]"
        if p == []:
            raise RequestError(f"{name}: input_ids cannot be empty.")
        _token_list(p, name, vocab_size)
    return single, prompts


def _apply_rules(req: GenRequest, context_len: int, allow_auto_truncate: bool) -> None:
    """SGLang's edge rules, in its order (engines/request_rules.py); a refusal is a 400 with SGLang's message."""
    rules = request_rules
    try:
        n = rules.tokenizer_input_length(len(req.input_ids), context_len, allow_auto_truncate)
        if req.max_new_tokens_given:  # the tokenizer manager checks only a max_new_tokens the request set
            req.max_new_tokens = rules.admitted_max_new_tokens(n, req.max_new_tokens, context_len, allow_auto_truncate)
        req.max_new_tokens = rules.scheduled_max_new_tokens(n, req.max_new_tokens, context_len)
        n = rules.scheduler_input_length(n, context_len, allow_auto_truncate)
        del req.input_ids[n:]
        req.logprob_start_len = rules.logprob_start(req.return_logprob, req.logprob_start_len, n)
    except rules.RuleError as err:
        raise RequestError(str(err)) from None


def _per_prompt(body: dict[str, Any], key: str, i: int, num: int, single: bool) -> Any:
    """A field given once for the whole batch, or as a list with one value per prompt."""
    value = body.get(key)
    if isinstance(value, list) and not single:
        if len(value) != num:
            raise RequestError(f"{key} list has {len(value)} entries for {num} prompts")
        return value[i]
    return value


def _logprob_fields(body: dict[str, Any], req: GenRequest, vocab_size: int, i: int, num: int, single: bool) -> None:
    rl = _per_prompt(body, "return_logprob", i, num, single)
    req.return_logprob = False if rl is None else _bool(rl, "return_logprob")
    start = _per_prompt(body, "logprob_start_len", i, num, single)
    if start is not None:
        req.logprob_start_len = _int(start, "logprob_start_len", -1, 1 << 30)
    top = _per_prompt(body, "top_logprobs_num", i, num, single)
    if top is not None:
        req.top_logprobs_num = _int(top, "top_logprobs_num", 0, min(MAX_TOP_LOGPROBS, vocab_size))
    rid = _per_prompt(body, "rid", i, num, single)
    if rid is not None and not isinstance(rid, str):
        raise RequestError("rid must be a string (or a list of strings for a batch)")
    req.rid = rid


def triples(logprobs: Sequence[float | None], token_ids: list[int]) -> list[list]:
    """SGLang's [logprob, token_id, text] triples (text is None: return_text_in_logprobs=False)."""
    return [[lp, int(t), None] for lp, t in zip(logprobs, token_ids)]


def finish_reason(kind: str, matched: int | None = None, length: int = 0, message: str = "") -> dict[str, Any]:
    if kind == "stop":
        return {"type": "stop", "matched": matched}
    if kind == "length":
        return {"type": "length", "length": length}
    return {"type": "abort", "message": message}


def parse_finish_reason(meta: dict[str, Any]) -> str:
    """'stop' | 'length' | 'abort' from an SGLang meta_info (its finish_reason may be null while running)."""
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if kind not in ("stop", "length", "abort"):
        raise ValueError(f"unexpected finish_reason {fr!r} in server response")
    return kind


def encode_routed_experts(routes: Any) -> str:
    """[tokens, layers, k] expert ids -> SGLang's meta_info.routed_experts: base64 of the int32 bytes."""
    import base64

    import numpy as np

    return base64.b64encode(np.ascontiguousarray(routes, dtype=np.int32).tobytes()).decode("ascii")


def decode_routed_experts(text: str, tokens: int, layers: int, topk: int) -> Any:
    """SGLang's base64 int32 routed experts -> an int16 (int32 past 32767) numpy array [tokens, layers, k]."""
    import base64

    import numpy as np

    flat = np.frombuffer(base64.b64decode(text), dtype=np.int32)
    if flat.size != tokens * layers * topk:
        raise ValueError(
            f"routed_experts holds {flat.size} ids; expected {tokens} tokens x {layers} layers x {topk} experts"
        )
    small = flat.size == 0 or int(flat.max()) <= np.iinfo(np.int16).max
    return flat.reshape(tokens, layers, topk).astype(np.int16 if small else np.int32)
