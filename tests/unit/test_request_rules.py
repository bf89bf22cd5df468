"""Each edge rule of engines/request_rules.py against SGLang's own code, run from the pinned wheel.

The functions that hold the rules are cut out of SGLang's source (`ast`, nothing is imported) and run with
small stand-ins for the objects they touch: `TokenizerManager._validate_one_request` (input and total
length), `Scheduler.init_req_max_new_tokens` (the max_new_tokens cap), `validate_input_length` (the
scheduler's input limit), `Req._check_token_based_finish` (stop tokens vs EOS vs ignore_eos). On a grid of
lengths and budgets, with and without --allow-auto-truncate, the project's rule must give the same value, or
refuse with the same message. The log-prob start rule lives inside a long scheduler method: its lines are
found in the source and the project's rule is checked against the cases they spell out.
"""

from __future__ import annotations

import ast
import functools
import zipfile
from types import SimpleNamespace

import pytest
from test_sglang_contract import SourceUnavailable, sglang_pin, sglang_wheel

from rlad_megatron.engines import request_rules as rules

CONTEXTS = (16, 48)


@functools.cache
def _source(path: str) -> str:
    try:
        wheel = sglang_wheel(sglang_pin())
    except SourceUnavailable as err:
        pytest.skip(f"SGLang source unavailable: {err}")
    with zipfile.ZipFile(wheel) as z:
        return z.read(path).decode()


@functools.cache
def _function(path: str, name: str, owner: str | None = None):
    """SGLang's function `name` (a method of class `owner`), compiled on its own into a namespace of stand-ins."""
    tree = ast.parse(_source(path))
    scope = tree.body
    if owner is not None:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner).body
    node = next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    node.returns = None
    for arg in node.args.args + node.args.kwonlyargs:
        arg.annotation = None
    namespace = dict(STANDINS)
    exec(compile(ast.unparse(node), f"sglang:{path}:{name}", "exec"), namespace)  # noqa: S102 (pinned wheel)
    return namespace[name]


class _Logger:
    def warning(self, *args, **kwargs):
        pass

    error = info = debug = warning


class _Finish:
    def __init__(self, matched=None, length=None):
        self.matched, self.length = matched, length


STANDINS = {
    "logger": _Logger(),
    "get_exec": lambda: SimpleNamespace(features=SimpleNamespace(enable_encoder_swa_bounded_replay=False)),
    "EmbeddingReqInput": type("EmbeddingReqInput", (), {}),
    "GenerateReqInput": type("GenerateReqInput", (), {}),  # the request below is neither: generation checks skipped
    "FINISH_MATCHED_TOKEN": _Finish,
    "FINISH_LENGTH": _Finish,
}
TOKENIZER = "sglang/srt/managers/tokenizer_manager.py"
SCHEDULER = "sglang/srt/managers/scheduler.py"
UTILS = "sglang/srt/managers/utils.py"
REQ = "sglang/srt/managers/schedule_batch.py"


def _sglang_tokenizer_check(num_input: int, max_new_tokens: int | None, context_len: int, truncate: bool):
    """(input length, max_new_tokens) after SGLang's tokenizer manager, or its error message."""
    fn = _function(TOKENIZER, "_validate_one_request", "TokenizerManager")
    manager = SimpleNamespace(
        context_len=context_len,
        num_reserved_tokens=0,  # no speculative decoding
        allow_auto_truncate=truncate,
        validate_total_tokens=True,
        _validate_joint_schema_request=lambda obj, ids: None,
    )
    obj = SimpleNamespace(sampling_params={} if max_new_tokens is None else {"max_new_tokens": max_new_tokens})
    ids = list(range(num_input))
    try:
        fn(manager, obj, ids)
    except ValueError as err:
        return str(err)
    return len(ids), obj.sampling_params.get("max_new_tokens")


def _sglang_scheduler_cap(num_input: int, max_new_tokens: int, context_len: int) -> int:
    fn = _function(SCHEDULER, "init_req_max_new_tokens", "Scheduler")
    allocator = SimpleNamespace(max_new_tokens_for_memory=lambda input_len, budget, **kw: budget)  # memory is ample
    scheduler = SimpleNamespace(
        max_new_tokens_limit=None,
        max_req_len=context_len - 1,  # tp_worker: min(context_len - 1, kv_capacity - 1), KV capacity ample
        max_total_num_tokens=1 << 30,
        kv_shard_widening=1,
        page_size=1,
        token_to_kv_pool_allocator=allocator,
        sliding_window_size=None,
        chunked_prefill_size=-1,
    )
    req = SimpleNamespace(
        origin_input_ids=list(range(num_input)),
        sampling_params=SimpleNamespace(max_new_tokens=max_new_tokens, min_new_tokens=0),
    )
    fn(scheduler, req)
    return req.sampling_params.max_new_tokens


def _sglang_scheduler_input(num_input: int, context_len: int, truncate: bool):
    fn = _function(UTILS, "validate_input_length")
    req = SimpleNamespace(origin_input_ids=list(range(num_input)))
    error = fn(req, context_len - 1 - 5, truncate)  # tp_worker: max_req_input_len = max_req_len - 5
    return error if error else len(req.origin_input_ids)


def _ours(fn, *args):
    try:
        return fn(*args)
    except rules.RuleError as err:
        return str(err)


@pytest.mark.parametrize("context_len", CONTEXTS)
@pytest.mark.parametrize("truncate", [False, True], ids=["refuse", "auto_truncate"])
def test_input_and_total_length_follow_the_tokenizer_manager(context_len, truncate):
    for num_input in range(1, context_len + 4):
        for max_new_tokens in (None, 0, 1, context_len - num_input, context_len - num_input + 1, 10 * context_len):
            if max_new_tokens is not None and max_new_tokens < 0:
                continue
            want = _sglang_tokenizer_check(num_input, max_new_tokens, context_len, truncate)
            got = _ours(rules.tokenizer_input_length, num_input, context_len, truncate)
            if not isinstance(got, str) and max_new_tokens is not None:
                budget = _ours(rules.admitted_max_new_tokens, got, max_new_tokens, context_len, truncate)
                got = budget if isinstance(budget, str) else (got, budget)
            elif not isinstance(got, str):
                got = (got, None)
            assert got == want, (num_input, max_new_tokens, context_len, truncate)


@pytest.mark.parametrize("context_len", CONTEXTS)
def test_max_new_tokens_cap_follows_the_scheduler(context_len):
    for num_input in range(1, context_len + 2):
        for max_new_tokens in (0, 1, 5, context_len - num_input - 2, context_len - num_input, 1 << 30):
            if max_new_tokens < 0:
                continue
            want = _sglang_scheduler_cap(num_input, max_new_tokens, context_len)
            assert rules.scheduled_max_new_tokens(num_input, max_new_tokens, context_len) == want
            assert rules.fit_max_new_tokens(num_input, max_new_tokens, context_len) == want


@pytest.mark.parametrize("context_len", CONTEXTS)
@pytest.mark.parametrize("truncate", [False, True], ids=["refuse", "auto_truncate"])
def test_scheduler_input_limit_follows_validate_input_length(context_len, truncate):
    for num_input in range(1, context_len + 2):
        want = _sglang_scheduler_input(num_input, context_len, truncate)
        assert _ours(rules.scheduler_input_length, num_input, context_len, truncate) == want, num_input


def test_a_fitted_budget_passes_every_sglang_check():
    """What the client asks for (fit_max_new_tokens) is admitted unchanged and not cut further."""
    for context_len in CONTEXTS:
        for num_input in range(1, context_len - 6):
            budget = rules.fit_max_new_tokens(num_input, 10 * context_len, context_len)
            assert _sglang_tokenizer_check(num_input, budget, context_len, False) == (num_input, budget)
            assert _sglang_scheduler_cap(num_input, budget, context_len) == budget
            assert _sglang_scheduler_input(num_input, context_len, False) == num_input


def _sglang_token_finish(output_ids, stop_token_ids, eos_token_ids, ignore_eos):
    fn = _function(REQ, "_check_token_based_finish", "Req")
    req = SimpleNamespace(
        sampling_params=SimpleNamespace(ignore_eos=ignore_eos, stop_token_ids=set(stop_token_ids)),
        eos_token_ids=set(eos_token_ids),
        tokenizer=None,  # rlad serve and the in-process engine stop on the model config's EOS ids
        output_ids=list(output_ids),
        finished_reason=None,
        finished_len=None,
    )
    stopped = fn(req, list(output_ids[-1:]))
    return stopped, (req.finished_reason.matched if stopped else None)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_stop_tokens_follow_the_request_finish_check(ignore_eos):
    eos = (1,)
    for stop_ids in ((), (7,), (7, 1)):
        ends = rules.stop_tokens(stop_ids, eos, ignore_eos)
        for token in (1, 5, 7):
            stopped, matched = _sglang_token_finish([3, token], stop_ids, eos, ignore_eos)
            assert (token in ends) == stopped, (stop_ids, token, ignore_eos)
            assert matched == (token if stopped else None)


def test_logprob_start_rule_is_the_schedulers():
    source = _source(SCHEDULER)
    for line in (  # the lines of Scheduler.handle_generate_request the rule transcribes
        "if not recv_req.return_logprob and recv_req.logprob_start_len != -1:",
        "req.logprob_start_len = len(req.origin_input_ids)",
        "if req.logprob_start_len > len(req.origin_input_ids):",
        'error_msg = f"{req.logprob_start_len=} is higher than the number of input tokens '
        '{len(req.origin_input_ids)=}. Please use a smaller logprob_start_len."',
    ):
        assert line in source, f"SGLang's scheduler changed: {line!r} is gone"
    assert rules.logprob_start(False, 9, 4) == 4  # ignored without return_logprob
    assert rules.logprob_start(True, -1, 4) == 4  # -1: output tokens only
    assert rules.logprob_start(True, 4, 4) == 4 and rules.logprob_start(True, 0, 4) == 0
    req = SimpleNamespace(logprob_start_len=5, origin_input_ids=[0] * 4)
    with pytest.raises(rules.RuleError) as err:
        rules.logprob_start(True, 5, 4)
    assert str(err.value) == (
        f"{req.logprob_start_len=} is higher than the number of input tokens {len(req.origin_input_ids)=}. "
        "Please use a smaller logprob_start_len."
    )


def test_empty_input_is_refused_with_sglangs_message():
    assert 'raise ValueError("input_ids cannot be empty.")' in _source("sglang/srt/managers/io_struct.py")
    with pytest.raises(rules.RuleError, match=r"^input_ids cannot be empty\.$"):
        rules.prompt_length(0, 16)
