"""In-process equals over-HTTP: one corpus through the embedded engine, `rlad serve`, and `rlad serve` behind sglang-router.

The corpus holds ordinary requests and the edge cases of engines/request_rules.py (max_new_tokens beyond the
context, max_new_tokens=0, stop tokens vs EOS, ignore_eos, prompts too long for the context), greedy and
seeded sampling with top-p / top-k, n > 1, and scoring with top-k log-probs. Every path must give the same
token ids and finish reasons exactly (a sample depends only on its seed), the same log-probs up to fp32
rounding (LOGPROB_TOL: the same code runs on both sides, but a CPU matmul may round a row differently when the
batch it runs in has another size, and the server batches concurrent requests as they arrive), and refuse
the same requests with the same message. Raw /generate bodies
(text prompts, logprob_start_len, n > 1 ordering, the context refusals) must get the same answer from the
server directly and through the router.
"""

from __future__ import annotations

import httpx
import pytest
from train_helpers import subprocess_env

from rlad_megatron.engines import request_rules
from rlad_megatron.engines.base import SamplingParams
from rlad_megatron.engines.client import HttpEngine
from rlad_megatron.engines.embedded import EmbeddedEngine
from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet, launch_router

CONTEXT = 40  # short, so the context edges are a few tokens away
LOGPROB_TOL = 1e-5  # fp32 rounding of one row across batch sizes is ~5e-7 here; a wrong token is ~1e-1 or more


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from rlad_megatron.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("differential")
    model = save_tiny_model(root / "model", "qwen2", seed=3, max_position_embeddings=CONTEXT)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = launch_fleet(
        [embedded_server_cmd(str(model), port, threads=1)], [url], str(root / "logs"), 120, env=subprocess_env()
    )
    router = launch_router([url], free_port(), str(root / "logs"))  # None without sglang-router
    yield model, url, router.url if router else None
    if router is not None:
        router.stop(grace_s=5)
    for p in procs:
        p.stop(grace_s=5)


@pytest.fixture(scope="module")
def engines(paths):
    model, url, router_url = paths
    built = {"in-process": EmbeddedEngine(model), "rlad serve": HttpEngine([url], context_length=CONTEXT)}
    if router_url is not None:
        built["sglang-router"] = HttpEngine([router_url], context_length=CONTEXT)
    yield built
    for engine in built.values():
        engine.close()


def _prompts(n: int, length: int, offset: int = 0) -> list[list[int]]:
    return [[4 + (7 * i + 3 * j + offset) % 40 for j in range(length)] for i in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, max_new_tokens=7, seed=11)
CORPUS = {
    "greedy": (_prompts(3, 5), GREEDY, 1),
    "seeded top-p top-k, n=3": (_prompts(2, 4, 1), SEEDED, 3),
    "seeded plain": (_prompts(2, 6, 2), SamplingParams(temperature=1.0, max_new_tokens=6, seed=5), 2),
    "max_new_tokens beyond the context": (_prompts(2, 28, 3), SamplingParams(temperature=0.0, max_new_tokens=500), 1),
    "mixed lengths near the context": (
        [[5] * 30, [6] * 3],
        SamplingParams(temperature=0.7, max_new_tokens=99, seed=2),
        1,
    ),
    "max_new_tokens=0": (_prompts(2, 5, 4), SamplingParams(temperature=0.0, max_new_tokens=0), 1),
    "ignore_eos": (_prompts(2, 5, 5), SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True), 1),
}


def _outputs(engine, prompts, sampling, n):
    return [
        [(o.response_ids, o.logprobs, o.finish_reason) for o in per_prompt]
        for per_prompt in engine.generate(prompts, sampling, n=n)
    ]


def _same(got, expected) -> bool:
    """Equal structure, ints and strings exactly, floats within LOGPROB_TOL (None matches only None)."""
    if isinstance(expected, float):
        return isinstance(got, float) and abs(got - expected) <= LOGPROB_TOL
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(got, (list, tuple))
            and len(got) == len(expected)
            and all(_same(g, e) for g, e in zip(got, expected))
        )
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(_same(got[k], v) for k, v in expected.items())
        )
    return got == expected and type(got) is type(expected)


@pytest.mark.parametrize("case", list(CORPUS))
def test_generate_is_identical_in_process_and_over_http(engines, case):
    prompts, sampling, n = CORPUS[case]
    results = {name: _outputs(engine, prompts, sampling, n) for name, engine in engines.items()}
    expected = results.pop("in-process")
    for name, got in results.items():
        assert _same(got, expected), f"{case}: {name} differs from the in-process engine: {got} != {expected}"
    for prompt, per_prompt in zip(prompts, expected):
        budget = request_rules.fit_max_new_tokens(len(prompt), sampling.max_new_tokens, CONTEXT)
        assert all(len(ids) <= budget for ids, _, _ in per_prompt)
        if case == "max_new_tokens beyond the context":  # the clamp, not an error: the context is filled
            assert [len(ids) for ids, _, reason in per_prompt if reason == "length"] in ([], [budget])


def test_stop_tokens_and_eos_are_identical(engines):
    """A stop token taken from a greedy run ends the same sequence at the same place on every path."""
    prompts = _prompts(2, 5, 6)
    free = engines["in-process"].generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True))
    stop = free[0][0].response_ids[4]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(stop,))
    results = {name: _outputs(engine, prompts, sampling, 1) for name, engine in engines.items()}
    expected = results.pop("in-process")
    ids, _, reason = expected[0][0]
    assert reason == "stop" and ids[-1] in (stop, *engines["in-process"].spec.eos_token_ids)
    for name, got in results.items():
        assert _same(got, expected), name


def _plain(column):
    """Top-k columns come as numpy arrays (int32 ids, float32 log-probs): compare them as Python lists."""
    return column.tolist() if hasattr(column, "tolist") else column


def test_score_with_top_k_is_identical(engines):
    seqs = _prompts(3, 12, 7) + [[9] * 33]
    starts = [3, 11, 12, 20]
    results = {
        name: [
            (_plain(s.logprobs), _plain(s.topk_ids), _plain(s.topk_logprobs))
            for s in engine.score(seqs, starts, top_k=3)
        ]
        for name, engine in engines.items()
    }
    expected = results.pop("in-process")
    for name, got in results.items():
        assert _same(got, expected), name


def test_too_long_prompts_are_refused_alike(engines):
    """SGLang's scheduler limit (context - 6 tokens): the same error in-process and over HTTP."""
    limit = request_rules.max_req_input_len(CONTEXT)
    messages = set()
    for engine in engines.values():
        with pytest.raises(ValueError, match=rf"Input length \({limit} tokens\) exceeds") as err:
            engine.generate([[5] * limit], GREEDY)
        messages.add(str(err.value))
        with pytest.raises(ValueError, match="longer than the model's context length"):
            engine.score([[5] * CONTEXT], [1])
    assert len(messages) == 1


RAW = {
    "text prompt": {"text": "1+2=", "sampling_params": {"temperature": 0, "max_new_tokens": 4}},
    "text prompt, n=2": {
        "text": "12+3=",
        "sampling_params": {"temperature": 0.8, "max_new_tokens": 3, "n": 2, "sampling_seed": 4},
        "return_logprob": True,
    },
    "batch, n=2": {
        "input_ids": [[5, 6, 7, 8, 9], [10, 11, 12, 13]],
        "sampling_params": {"temperature": 0.8, "max_new_tokens": 3, "n": 2, "sampling_seed": 4},
    },
    "logprob_start_len inside": {
        "input_ids": [5, 6, 7, 8, 9],
        "sampling_params": {"temperature": 0, "max_new_tokens": 2},
        "return_logprob": True,
        "logprob_start_len": 2,
        "top_logprobs_num": 2,
    },
    "logprob_start_len at the end": {
        "input_ids": [5, 6, 7],
        "sampling_params": {"temperature": 0, "max_new_tokens": 2},
        "return_logprob": True,
        "logprob_start_len": 3,
    },
    "logprob_start_len beyond the prompt": {
        "input_ids": [5, 6, 7],
        "sampling_params": {"max_new_tokens": 2},
        "return_logprob": True,
        "logprob_start_len": 4,
    },
    "prefill only (scoring)": {
        "input_ids": [[5, 6, 7, 8], [9, 10]],
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 3,
    },
    "max_new_tokens over the context": {"input_ids": [5] * 30, "sampling_params": {"max_new_tokens": 11}},
    "input as long as the context": {"input_ids": [5] * CONTEXT},
    "empty input": {"input_ids": []},
}


def _answer(url: str, body: dict):
    r = httpx.post(url + "/generate", json=body, timeout=60)
    if r.status_code != 200:
        return r.status_code, r.json()["error"]["message"] if "json" in r.headers.get("content-type", "") else r.text
    out = r.json()
    for item in out if isinstance(out, list) else [out]:
        item["meta_info"].pop("id")
        item["meta_info"].pop("e2e_latency")
    return 200, out


def test_raw_requests_answer_alike_directly_and_through_the_router(paths):
    _, url, router_url = paths
    if router_url is None:
        pytest.skip("sglang-router is not installed in this environment")
    answers = {case: _answer(url, body) for case, body in RAW.items()}
    for case, body in RAW.items():
        assert _same(_answer(router_url, body), answers[case]), case
    assert answers["text prompt"][1]["meta_info"]["prompt_tokens"] == 4  # tokenized by the served model's tokenizer
    assert [o["meta_info"]["prompt_tokens"] for o in answers["text prompt, n=2"][1]] == [5, 5]
    batch = answers["batch, n=2"][1]
    assert [o["meta_info"]["prompt_tokens"] for o in batch] == [5, 4, 5, 4]  # output k = prompt k % 2
    inside = answers["logprob_start_len inside"][1]["meta_info"]
    assert [e[1] for e in inside["input_token_logprobs"]] == [7, 8, 9] and inside["input_token_logprobs"][0][0] is None
    assert answers["logprob_start_len at the end"][1]["meta_info"]["input_token_logprobs"] == []
    assert answers["logprob_start_len beyond the prompt"] == (
        400,
        "req.logprob_start_len=4 is higher than the number of input tokens len(req.origin_input_ids)=3. "
        "Please use a smaller logprob_start_len.",
    )
    prefill = answers["prefill only (scoring)"][1]
    assert [o["output_ids"] for o in prefill] == [[], []]
    assert [o["meta_info"]["finish_reason"] for o in prefill] == [{"type": "length", "length": 0}] * 2
    assert answers["max_new_tokens over the context"][0] == 400
    assert "maximum context length of 40 tokens" in answers["max_new_tokens over the context"][1]
    assert answers["input as long as the context"] == (
        400,
        f"The input ({CONTEXT} tokens) is longer than the model's context length ({CONTEXT} tokens).",
    )
    assert answers["empty input"] == (400, "input_ids cannot be empty.")
