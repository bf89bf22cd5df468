"""The embedded server's SGLang-compatible API, its validation (hypothesis fuzzing) and security defaults."""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlad_megatron.engines import server
from rlad_megatron.engines.protocol import RequestError, parse_generate
from rlad_megatron.tiny_models import save_tiny_model

GOOD = {"input_ids": [5, 6, 7], "sampling_params": {"temperature": 0, "max_new_tokens": 3}}


def _client(model_dir, *extra):
    ap = argparse.ArgumentParser()
    server.add_arguments(ap)
    state = server.build_state(ap.parse_args(["--model", str(model_dir), *extra]))
    return TestClient(server.create_app(state)), state


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    save_tiny_model(root / "base", "llama", seed=0, max_position_embeddings=48)
    save_tiny_model(root / "step_1", "llama", seed=9, max_position_embeddings=48)
    return root


@pytest.fixture(scope="module")
def client(root):
    c, state = _client(root / "base", "--weights-root", str(root))
    yield c
    state.scheduler.stop()


def test_response_shapes_follow_sglang(client):
    body = {
        "input_ids": [5, 6, 7, 8],
        "sampling_params": {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": 1,
        "top_logprobs_num": 2,
    }
    out = client.post("/generate", json=body).json()
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 4 and meta["completion_tokens"] == 4 and meta["prompt_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert [e[1] for e in meta["input_token_logprobs"]] == [6, 7, 8]  # from logprob_start_len on
    assert meta["input_token_logprobs"][0][0] is None and all(e[0] < 0 for e in meta["input_token_logprobs"][1:])
    assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]
    assert meta["input_top_logprobs"][0] is None and all(len(r) == 2 for r in meta["input_top_logprobs"][1:])
    assert len(meta["output_top_logprobs"]) == 4
    greedy_top = [r[0][1] for r in meta["output_top_logprobs"]]
    assert greedy_top == out["output_ids"]  # greedy picks the top-1 token of the same distribution
    default = client.post("/generate", json={**body, "logprob_start_len": -1}).json()["meta_info"]
    assert default["input_token_logprobs"] == []  # -1: output tokens only (SGLang sets the start to len(input))


def test_batch_and_n_ordering_like_sglang(client):
    body = {
        "input_ids": [[5, 6], [7, 8, 9]],
        "sampling_params": {"temperature": 0, "max_new_tokens": 2, "n": 2, "ignore_eos": True},
    }
    out = client.post("/generate", json=body).json()
    assert len(out) == 4 and [o["meta_info"]["prompt_tokens"] for o in out] == [2, 3, 2, 3]
    single = client.post("/generate", json={**GOOD, "sampling_params": {"max_new_tokens": 2, "n": 3}}).json()
    assert isinstance(single, list) and len(single) == 3


@pytest.mark.parametrize(
    "body,message",
    [
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [1, 2, 10_000]}, "token ids must be integers in"),
        ({"input_ids": [1, -2]}, "token ids must be"),
        ({"input_ids": [[1], []]}, "input_ids[1]"),
        ({"input_ids": [1, 2], "sampling_params": {"temperature": -1}}, "temperature"),
        ({"input_ids": [1, 2], "sampling_params": {"top_p": 0}}, "top_p"),
        ({"input_ids": [1, 2], "sampling_params": {"top_k": 0}}, "top_k=0"),
        ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 10**9}}, "maximum context length of 48"),
        ({"input_ids": [1] * 60}, "context length"),
        ({"input_ids": [1, 2], "sampling_params": {"n": 0}}, "n=0"),
        ({"input_ids": [1, 2], "sampling_params": {"stop": ["x"]}}, "stop strings"),
        ({"input_ids": [1, 2], "sampling_params": {"bogus": 1}}, "unknown sampling_params"),
        ({"input_ids": [1, 2], "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len=5 is higher"),
        ({"text": "hello", "input_ids": [1]}, "either text or input_ids"),
        ({"input_ids": [1, 2], "stream": True}, "stream"),
        ({"input_ids": [1, 2], "return_hidden_states": True}, "return_hidden_states"),
        ({"input_ids": [1.5]}, "token ids"),
        ({"input_ids": [True]}, "token ids"),
    ],
)
def test_bad_requests_get_400_with_a_message(client, body, message):
    r = client.post("/generate", json=body)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


def test_malformed_bodies(client):
    for raw in (b"{", b"", b"\xff\xfe", b"[1,2]", b'"x"', b"NaN", b"[" * 100_000):
        r = client.post("/generate", content=raw)
        assert r.status_code == 400, raw[:10]
    assert client.post("/generate", json=GOOD).status_code == 200


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
_num = st.one_of(
    st.integers(-(2**65), 2**65), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.text(max_size=3)
)
_ids = st.one_of(
    st.lists(st.integers(-5, 200), max_size=50), st.lists(st.lists(st.integers(-1, 120), max_size=5), max_size=3), _json
)
_body = st.fixed_dictionaries(
    {"input_ids": _ids},
    optional={
        "sampling_params": st.one_of(
            _json,
            st.dictionaries(
                st.sampled_from(
                    [
                        "temperature",
                        "top_p",
                        "top_k",
                        "max_new_tokens",
                        "n",
                        "sampling_seed",
                        "stop_token_ids",
                        "ignore_eos",
                    ]
                ),
                _num,
                max_size=5,
            ),
        ),
        "return_logprob": _json,
        "logprob_start_len": _num,
        "top_logprobs_num": _num,
        "rid": _json,
    },
)


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(_body, _json))
def test_parser_never_raises_anything_but_request_error(body):
    try:
        reqs = parse_generate(body, vocab_size=101, max_context=48)
    except RequestError as err:
        assert 400 <= err.status < 500 and str(err)
        return
    for r in reqs:  # accepted requests are fully valid
        assert all(0 <= t < 101 for t in r.input_ids) and 0 <= r.max_new_tokens <= 48 - len(r.input_ids)
        assert math.isfinite(r.temperature) and 0 < r.top_p <= 1 and 1 <= r.n <= 64


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_body)
def test_fuzzed_http_requests_get_4xx_or_200_and_server_keeps_serving(client, body):
    if isinstance(body.get("sampling_params"), dict):
        body["sampling_params"].pop("max_new_tokens", None)  # keep accepted fuzz cases quick
        body["sampling_params"]["max_new_tokens"] = 2
    r = client.post("/generate", content=json.dumps(body, allow_nan=True))
    assert r.status_code == 200 or 400 <= r.status_code < 500, r.text
    assert client.post("/generate", json=GOOD).status_code == 200


def test_allow_auto_truncate_cuts_instead_of_refusing(root):
    """--allow-auto-truncate (SGLang's flag): prompt and max_new_tokens are cut to the context (48 here)."""
    c, state = _client(root / "base", "--allow-auto-truncate")
    try:
        sp = {"temperature": 0, "max_new_tokens": 100, "ignore_eos": True}
        out = c.post("/generate", json={"input_ids": [5] * 30, "sampling_params": sp}).json()
        assert out["meta_info"]["prompt_tokens"] == 30
        assert out["meta_info"]["completion_tokens"] == 48 - 2 - 30  # admitted 48 - 30, then the scheduler's cap
        long = c.post("/generate", json={"input_ids": [5] * 60, "sampling_params": sp}).json()
        assert long["meta_info"]["prompt_tokens"] == 48 - 6 and long["output_ids"] == []  # cut to max_req_input_len
    finally:
        state.scheduler.stop()
    refused = _client(root / "base")
    try:
        r = refused[0].post("/generate", json={"input_ids": [5] * 30, "sampling_params": sp})
        assert r.status_code == 400 and "maximum context length of 48 tokens" in r.json()["error"]["message"]
    finally:
        refused[1].scheduler.stop()


def test_api_key_is_required_on_every_endpoint(root):
    c, state = _client(root / "base", "--api-key", "s3cret", "--weights-root", str(root))
    try:
        calls = [
            ("get", "/health", None),
            ("get", "/get_model_info", None),
            ("get", "/health_generate", None),
            ("post", "/generate", GOOD),
            ("post", "/flush_cache", None),
            ("post", "/update_weights_from_disk", {"model_path": str(root / "step_1")}),
        ]
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                assert c.request(method, path, json=body, headers=headers).status_code == 401, (path, headers)
        ok = {"Authorization": "Bearer s3cret"}
        assert c.get("/health", headers=ok).status_code == 200
        assert c.post("/generate", json=GOOD, headers=ok).status_code == 200
    finally:
        state.scheduler.stop()


def test_update_weights_from_disk_only_under_root(client, root, tmp_path):
    before = client.post("/generate", json={**GOOD, "return_logprob": True}).json()
    outside = tmp_path / "outside"
    save_tiny_model(outside, "llama", seed=4, max_position_embeddings=48)
    r = client.post("/update_weights_from_disk", json={"model_path": str(outside)})
    assert r.status_code == 403 and "outside the allowed weights root" in r.json()["message"]
    link = root / "sneaky"
    os.symlink(outside, link)
    assert client.post("/update_weights_from_disk", json={"model_path": str(link)}).status_code == 403
    assert (
        client.post("/update_weights_from_disk", json={"model_path": str(root / "../" / outside.name)}).status_code
        == 403
    )
    assert client.post("/update_weights_from_disk", json={"path": "x"}).status_code == 400
    (root / "broken").mkdir()
    (root / "broken" / "config.json").write_text((root / "base" / "config.json").read_text())
    r = client.post("/update_weights_from_disk", json={"model_path": str(root / "broken")})
    assert r.status_code == 400 and not r.json()["success"]
    same = client.post("/generate", json={**GOOD, "return_logprob": True}).json()
    assert same["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]

    r = client.post("/update_weights_from_disk", json={"model_path": str(root / "step_1"), "weight_version": "1"})
    assert r.status_code == 200 and r.json()["success"]
    assert client.get("/get_model_info").json()["weight_version"] == "1"
    after = client.post("/generate", json={**GOOD, "return_logprob": True}).json()
    assert after["meta_info"]["weight_version"] == "1"
    assert after["meta_info"]["output_token_logprobs"] != before["meta_info"]["output_token_logprobs"]


def test_no_weights_root_means_no_disk_updates(root):
    c, state = _client(root / "base")
    try:
        r = c.post("/update_weights_from_disk", json={"model_path": str(root / "step_1")})
        assert r.status_code == 403 and "--weights-root" in r.json()["message"]
    finally:
        state.scheduler.stop()
