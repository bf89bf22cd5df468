"""Weight sync sink (b) on CPU: live Megatron model -> HF buckets -> the embedded engine, and SGLang's payloads.

One process (gloo world of 1) builds the student with the backend's `build_model`, loads a tiny
HF model, perturbs every weight (a "trained" student), and exports buckets. The embedded engine
loads the buckets in place and must then score exactly like the trainer's own forward pass.
The SGLang NCCL flow is driven with its HTTP calls and `dist.broadcast` recorded instead of
sent: each request must describe its bucket (names, dtypes, shapes) in broadcast order.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rlad_megatron.conversion import tables
from rlad_megatron.tiny_models import save_tiny_model

BUCKET_BYTES = 16 << 10
IDS = [[5, 17, 42, 9, 77, 3, 61, 28], [64, 2, 8, 99, 41, 12, 56, 70]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rlad_megatron.backends.megatron.checkpoint_convert import load_hf_weights
    from rlad_megatron.backends.megatron.model import build_model
    from rlad_megatron.backends.megatron.parallel import destroy_parallel, init_parallel
    from rlad_megatron.config import ModelConfig, ParallelConfig

    hf = save_tiny_model(tmp_path_factory.mktemp("sync") / "hf", "qwen3", seed=1)
    ctx = init_parallel(ParallelConfig(), seed=0)
    chunks = build_model(hf, ModelConfig(transformer_impl="local"), ParallelConfig())
    load_hf_weights(chunks, hf)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    yield hf, chunks
    destroy_parallel(ctx)


def _trainer_logprobs(model) -> torch.Tensor:
    tokens = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., : model.vocab_size_unpadded]
    logprobs = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logprobs[:, :-1], -1, tokens[:, 1:, None])[..., 0]  # [b, s-1]


def test_buckets_cover_the_table_in_order_and_never_alias_params(trained):
    from rlad_megatron.backends.megatron.weight_export import (
        export_hf_tensors,
        model_arch,
    )

    _, chunks = trained
    buckets = list(export_hf_tensors(chunks, bucket_bytes=BUCKET_BYTES))
    arch = model_arch(chunks[0])
    assert [n for b in buckets for n, _ in b] == tables.expected_hf_names(arch)
    assert len(buckets) > 3
    assert all(sum(t.numel() * t.element_size() for _, t in b) <= BUCKET_BYTES or len(b) == 1 for b in buckets)
    norm = dict(kv for b in buckets for kv in b)["model.norm.weight"]
    before = norm.clone()
    with torch.no_grad():
        chunks[0].decoder.final_layernorm.weight.add_(1.0)
    assert torch.equal(norm, before)  # the export is a copy, not a view of the live weight
    with torch.no_grad():
        chunks[0].decoder.final_layernorm.weight.sub_(1.0)


def test_embedded_engine_scores_like_the_trainer_after_bucket_updates(trained):
    from rlad_megatron.backends.megatron.weight_export import export_hf_tensors
    from rlad_megatron.engines.embedded import EmbeddedEngine

    hf, chunks = trained
    engine = EmbeddedEngine(hf)
    expected = _trainer_logprobs(chunks[0])
    stale = torch.tensor([engine.score([ids], [1])[0].logprobs for ids in IDS])
    assert (stale - expected).abs().max() > 1e-2  # the engine starts from the untrained weights
    for bucket in export_hf_tensors(chunks, bucket_bytes=BUCKET_BYTES):
        engine.update_weights(named_tensors=bucket, version=1)
    synced = torch.tensor([engine.score([ids], [1])[0].logprobs for ids in IDS])
    torch.testing.assert_close(synced, expected, atol=1e-5, rtol=0)
    assert engine.version == 1


def test_distributed_requests_describe_each_bucket_and_the_broadcast_carries_its_bytes(trained, monkeypatch):
    """The trainer side of the wire sync: one /update_weights_from_distributed per bucket on every server,
    naming the bucket's tensors in order, then one flat broadcast whose bytes unflatten to those tensors."""
    import torch.distributed as dist

    from rlad_megatron.backends.megatron.weight_export import export_hf_tensors
    from rlad_megatron.engines import weight_sync as ws

    _, chunks = trained
    sender = ws.StageSender(0, ws.ServerCalls(), "127.0.0.1", "gloo", 10.0)
    sender.members, sender.name, sender.group = ["http://a", "http://b"], "rlad_weights_pp0_g1", object()
    posts, sent = [], []

    def post_all(urls, path, payload, during=None):
        posts.extend((u, path, payload) for u in urls)
        during()

    monkeypatch.setattr(sender.calls, "post_all", post_all)
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src, group: sent.append((tensor.clone(), src, group)))
    buckets = list(export_hf_tensors(chunks, bucket_bytes=BUCKET_BYTES, dtype=torch.bfloat16))
    assert len(buckets) > 1
    for bucket in buckets:
        sender.send(bucket, version=3)
    assert len(posts) == 2 * len(buckets) and {p[1] for p in posts} == {"/update_weights_from_distributed"}
    assert len(sent) == len(buckets)
    for k, bucket in enumerate(buckets):
        payloads = [p for _, _, p in posts[2 * k : 2 * k + 2]]
        assert payloads[0] == payloads[1]
        assert payloads[0]["names"] == [n for n, _ in bucket]
        assert payloads[0]["dtypes"] == ["bfloat16"] * len(bucket)
        assert payloads[0]["shapes"] == [list(t.shape) for _, t in bucket]
        assert payloads[0]["group_name"] == "rlad_weights_pp0_g1" and payloads[0]["weight_version"] == "3"
        assert payloads[0]["load_format"] == "flattened_bucket"
        flat, src, group = sent[k]
        assert src == 0 and group is sender.group and flat.dtype == torch.uint8
        got = ws.unflatten_bucket(flat, [torch.bfloat16] * len(bucket), payloads[0]["shapes"])
        for (_, want), have in zip(bucket, got):
            assert torch.equal(want, have)
