"""build_engine and the SGLang fleet: command construction on CPU, the real fleet and NCCL sync on GPU."""
from __future__ import annotations

import pytest
import torch

from rlad_megatron.config import RolloutConfig, TeacherConfig
from rlad_megatron.rollout import build_engine
from rlad_megatron.rollout.client import HttpEngine
from rlad_megatron.rollout.embedded import EmbeddedEngine
from rlad_megatron.rollout.factory import resolve_api_key, resolve_kind
from rlad_megatron.rollout.sglang_fleet import server_args_to_cli, sglang_server_cmd
from rlad_megatron.testing import save_tiny_model


def test_server_args_pass_through():
    args = {"tp": 2, "mem_fraction_static": 0.8, "enable_deterministic_inference": True, "disable_radix_cache": False,
            "cuda_graph_bs": [1, 2, 4]}
    assert server_args_to_cli(args) == ["--tp", "2", "--mem-fraction-static", "0.8", "--enable-deterministic-inference",
                                        "--cuda-graph-bs", "1", "2", "4"]
    cmd = sglang_server_cmd("/m", 30001, "127.0.0.1", {"tp": 2}, base_gpu_id=2, api_key="k")
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert cmd[cmd.index("--model-path") + 1] == "/m" and cmd[cmd.index("--base-gpu-id") + 1] == "2"
    assert cmd[cmd.index("--api-key") + 1] == "k" and cmd[-2:] == ["--tp", "2"]
    with pytest.raises(ValueError, match="set by the fleet"):
        sglang_server_cmd("/m", 1, "h", {"port": 5}, 0)


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

    from rlad_megatron.rollout.base import SamplingParams
    from rlad_megatron.rollout.fleet import free_port
    from rlad_megatron.rollout.sglang_fleet import SGLangFleet

    save_tiny_model(tmp_path / "base", "qwen2", seed=0)
    save_tiny_model(tmp_path / "new", "qwen2", seed=3)
    fleet = SGLangFleet(str(tmp_path / "base"), 1, {"tp": 1, "mem_fraction_static": 0.3, "dtype": "float32",
                                                   "skip_tokenizer_init": True}, str(tmp_path / "logs")).start()
    try:
        prompt = [5, 6, 7, 8]
        out = fleet.engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True))
        assert len(out[0][0].response_ids) == 6
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        fleet.init_weight_sync("127.0.0.1", free_port())
        new = AutoModelForCausalLM.from_pretrained(tmp_path / "new", dtype=torch.float32).cuda()
        fleet.update_weights_from_distributed(list(new.state_dict().items()), version=1)
        seq = prompt + out[0][0].response_ids
        got = fleet.engine.score([seq], [len(prompt)])[0].logprobs
        with torch.no_grad():
            lp = new(torch.tensor([seq]).cuda()).logits[0].float().log_softmax(-1)[len(prompt) - 1:-1]
        want = lp.gather(-1, torch.tensor(seq[len(prompt):]).cuda()[:, None]).squeeze(-1).cpu()
        torch.testing.assert_close(torch.tensor(got), want, atol=2e-3, rtol=0)
    finally:
        fleet.stop()
