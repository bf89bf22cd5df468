"""build_engine and the SGLang fleet: command construction on CPU, the real fleet and NCCL sync on GPU."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.config import RolloutConfig, TeacherConfig
from rlad_megatron.engines import build_engine
from rlad_megatron.engines.client import HttpEngine
from rlad_megatron.engines.embedded import EmbeddedEngine
from rlad_megatron.engines.factory import resolve_api_key, resolve_kind
from rlad_megatron.engines.sglang_fleet import (
    SGLangFleet,
    normalize_server_args,
    server_args_to_cli,
    sglang_server_cmd,
    tp_size,
)
from rlad_megatron.tiny_models import save_tiny_model


def test_server_args_pass_through():
    args = {
        "tp": 2,
        "mem_fraction_static": 0.8,
        "enable_deterministic_inference": True,
        "disable_radix_cache": False,
        "cuda_graph_bs": [1, 2, 4],
    }
    assert server_args_to_cli(args) == [
        "--tp",
        "2",
        "--mem-fraction-static",
        "0.8",
        "--enable-deterministic-inference",
        "--cuda-graph-bs",
        "1",
        "2",
        "4",
    ]
    cmd = sglang_server_cmd("/m", 30001, "127.0.0.1", {"tp": 2}, base_gpu_id=2, api_key="k")
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == "/m" and cmd[cmd.index("--base-gpu-id") + 1] == "2"
    assert cmd[cmd.index("--api-key") + 1] == "k" and cmd[-2:] == ["--tp-size", "2"] and "--tp" not in cmd
    with pytest.raises(ValueError, match="set by the fleet"):
        sglang_server_cmd("/m", 1, "h", {"port": 5}, 0)


def test_tp_is_sent_as_sglangs_tp_size():
    """`--tp` is no SGLang flag (argparse only took it as a prefix of --tp-size): a legacy `tp` key becomes
    --tp-size, a fleet's GPU count reads either spelling, and giving both is refused."""
    for args in ({"tp": 4}, {"tp_size": 4}, {"tensor_parallel_size": 4}):
        cmd = sglang_server_cmd("/m", 1, "h", args, 0)
        assert cmd[cmd.index("--tp-size") + 1] == "4" and "--tp" not in cmd and "--tensor-parallel-size" not in cmd
        assert tp_size(args) == 4 and SGLangFleet("/m", 2, args, "logs").tp == 4
    assert tp_size({}) == 1
    with pytest.raises(ValueError, match="tensor-parallel size twice"):
        normalize_server_args({"tp": 2, "tp_size": 2})


def test_build_engine_kinds(tmp_path, monkeypatch):
    save_tiny_model(tmp_path, "llama")
    if not torch.cuda.is_available():
        assert resolve_kind(RolloutConfig()) == "embedded"
        assert isinstance(build_engine(RolloutConfig(), str(tmp_path), "rollout"), EmbeddedEngine)
    cfg = TeacherConfig(kind="http", urls=["http://127.0.0.1:9"])
    monkeypatch.setenv("RLAD_API_KEY", "from-env")
    assert resolve_api_key(cfg) == "from-env"
    engine = build_engine(cfg, "", "teacher")
    assert isinstance(engine, HttpEngine) and engine.headers == {"Authorization": "Bearer from-env"}
    engine.close()
    with pytest.raises(ValueError, match="role"):
        build_engine(RolloutConfig(), str(tmp_path), "critic")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_engine(RolloutConfig(kind="embedded"), str(tmp_path / "nope"), "rollout")


@pytest.mark.gpu
def test_sglang_fleet_generates_and_syncs_weights_over_nccl(tmp_path):
    """Real SGLang: 1 server + router, generation, then an NCCL weight update checked against transformers."""
    from transformers import AutoModelForCausalLM

    from rlad_megatron.engines.base import SamplingParams
    from rlad_megatron.engines.sglang_fleet import SGLangFleet

    save_tiny_model(tmp_path / "base", "qwen2", seed=0)
    save_tiny_model(tmp_path / "new", "qwen2", seed=3)
    fleet = SGLangFleet(
        str(tmp_path / "base"),
        1,
        {"tp_size": 1, "mem_fraction_static": 0.3, "dtype": "float32", "skip_tokenizer_init": True},
        str(tmp_path / "logs"),
    ).start()
    try:
        prompt = [5, 6, 7, 8]
        out = fleet.engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
        assert len(out[0][0].response_ids) == 6
        from rlad_megatron.engines.weight_sync import ServerCalls, StageSender

        new = AutoModelForCausalLM.from_pretrained(tmp_path / "new", dtype=torch.float32).cuda()
        calls = ServerCalls()
        sender = StageSender(0, calls, "127.0.0.1", "nccl", 600.0)  # the trainer's side, as sync_over_wire runs it
        sender.connect(fleet.worker_urls, generation=1)
        calls.post_all(fleet.worker_urls, "/begin_weight_update", {})
        sender.send(list(new.state_dict().items()), version=1)
        calls.post_all(fleet.worker_urls, "/end_weight_update", {})
        assert calls.versions(fleet.worker_urls) == {u: "1" for u in fleet.worker_urls}
        seq = prompt + out[0][0].response_ids
        got = fleet.engine.score([seq], [len(prompt)])[0].logprobs
        with torch.no_grad():
            lp = new(torch.tensor([seq]).cuda()).logits[0].float().log_softmax(-1)[len(prompt) - 1 : -1]
        want = lp.gather(-1, torch.tensor(seq[len(prompt) :]).cuda()[:, None]).squeeze(-1).cpu()
        torch.testing.assert_close(torch.tensor(got), want, atol=2e-3, rtol=0)
    finally:
        fleet.stop()
