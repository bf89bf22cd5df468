"""`rlad serve`'s side of the distributed weight sync: SGLang 0.5.23's rules for the update window, groups
and formats (engines/weight_receiver.py). The successful broadcast path is exercised over real gloo groups by
tests/integration/test_weight_sync_wire.py; here every refusal, without a trainer."""

from __future__ import annotations

import argparse

import pytest
import torch
from fastapi.testclient import TestClient

from rlad_megatron.engines import server
from rlad_megatron.engines.weight_sync import flatten_bucket, unflatten_bucket
from rlad_megatron.tiny_models import save_tiny_model

UPDATE = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "g"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    model = save_tiny_model(tmp_path_factory.mktemp("m") / "m", "llama", seed=0)
    ap = argparse.ArgumentParser()
    server.add_arguments(ap)
    state = server.build_state(ap.parse_args(["--model", str(model)]))
    yield TestClient(server.create_app(state))
    state.scheduler.stop()


def _post(client, path, body=None):
    r = client.post(path, json=body if body is not None else {})
    return r.status_code, r.json()


def test_update_outside_the_window_is_refused_with_sglangs_message(client):
    status, body = _post(client, "/update_weights_from_distributed", UPDATE)
    assert status == 400 and not body["success"]
    assert "must run between begin_weight_update() and end_weight_update()" in body["message"]


def test_window_rules_double_begin_end_without_begin_unknown_group(client):
    assert _post(client, "/end_weight_update")[0] == 400
    assert _post(client, "/begin_weight_update") == (200, {"success": True, "message": "Success"})
    status, body = _post(client, "/begin_weight_update")
    assert status == 400 and "already open" in body["message"]
    status, body = _post(client, "/update_weights_from_distributed", UPDATE)
    assert status == 400 and "no weight update group named 'g'" in body["message"]
    assert _post(client, "/end_weight_update")[0] == 200  # an empty window changes nothing
    assert client.get("/model_info").json()["weight_version"] == "0"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"backend": "nccl"}, "cannot be honoured by rlad serve"),
        ({"rank_offset": 0}, "rank_offset=0 must be in [1, world_size=2)"),
        ({"master_port": "x"}, "master_port must be a int"),
    ],
)
def test_bad_group_requests_are_refused_by_name(client, change, message):
    body = {
        "master_address": "127.0.0.1",
        "master_port": 1,
        "rank_offset": 1,
        "world_size": 2,
        "group_name": "x",
        "backend": "gloo",
        **change,
    }
    status, answer = _post(client, "/init_weights_update_group", body)
    assert status == 400 and message in answer["message"]


def test_bad_update_requests_are_refused_by_name(client):
    assert _post(client, "/begin_weight_update")[0] == 200
    try:
        status, body = _post(client, "/update_weights_from_distributed", {**UPDATE, "dtypes": ["int4"]})
        assert status == 400 and "dtypes ['int4'] are not supported" in body["message"]
        status, body = _post(client, "/update_weights_from_distributed", {**UPDATE, "load_format": "npz"})
        assert status == 400 and "load_format='npz'" in body["message"]
        status, body = _post(client, "/update_weights_from_distributed", {**UPDATE, "shapes": []})
        assert status == 400 and "same length" in body["message"]
    finally:
        assert _post(client, "/end_weight_update")[0] == 200
    assert _post(client, "/destroy_weights_update_group", {"group_name": "nope"})[0] == 400


def test_flattened_bucket_round_trips_mixed_dtypes_and_checks_its_size():
    tensors = [torch.randn(3, 4), torch.randn(5).to(torch.bfloat16), torch.arange(6, dtype=torch.float16).view(2, 3)]
    flat = flatten_bucket(tensors)
    assert flat.dtype == torch.uint8 and flat.numel() == 12 * 4 + 5 * 2 + 6 * 2
    back = unflatten_bucket(flat, [t.dtype for t in tensors], [list(t.shape) for t in tensors])
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))
    with pytest.raises(ValueError, match="does not hold the announced"):
        unflatten_bucket(flat, [torch.float32], [[3, 4]])
