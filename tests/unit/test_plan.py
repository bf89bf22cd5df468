"""`rlad plan`: memory formulas against a hand computation, monotonicity, architectures, and whole recipes."""

import glob
import itertools
import json

import pytest

from rlad_megatron.cli import main as rlad
from rlad_megatron.config import load_config
from rlad_megatron.launch import capacity as cap
from rlad_megatron.launch import hardware as hw
from rlad_megatron.launch.plan import make_plan, recommend_split

TINY = cap.Arch(
    "tiny",
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    ffn_hidden_size=128,
    vocab_size=100,
    tie_word_embeddings=False,
)
RESERVE = 5 * 2**30
RECIPE = "tests/data/launch_qwen3_8b_32b.yaml"


def test_tiny_model_memory_by_hand():
    # per layer: q 64*64 + k,v 2*64*32 + o 64*64 + SwiGLU 3*64*128 + 2 norms 2*64 = 36992
    assert TINY.layer_params == 36992
    assert TINY.num_params == 2 * 36992 + 2 * 100 * 64 + 64
    mem = cap.student_memory(
        TINY, tp=1, pp=1, dp=4, micro_batch_tokens=10, num_microbatches=1, distributed_optimizer=False
    )
    # 18 bytes per param: bf16 weight 2 + fp32 grad 4 + fp32 main param, Adam m, v 12
    assert mem["params_grads_optimizer"] == (2 * 36992 + 2 * 6400) * 18
    # activations per layer: 12*s*h + 4*s*g + 8*s*f = 12*10*64 + 4*10*32 + 8*10*128 = 19200; 2 layers
    assert mem["activations"] == 2 * 19200
    # the log-prob step holds about 5 fp32 [tokens, V] tensors at its peak (whole row here: no chunking)
    assert mem["logits"] == 5 * 4 * 10 * 100 and mem["reserve"] == RESERVE
    assert mem["total"] == 86784 * 18 + 38400 + 20000 + RESERVE
    dist = cap.student_memory(TINY, tp=1, pp=1, dp=4, micro_batch_tokens=10, num_microbatches=1)
    assert dist["params_grads_optimizer"] == 86784 * (6 + 12 / 4)
    rec = cap.student_memory(TINY, tp=1, pp=1, dp=4, micro_batch_tokens=10, num_microbatches=1, recompute=True)
    assert rec["activations"] == 2 * (2 * 10 * 64) + 19200  # layer inputs + one layer recomputed
    tp2 = cap.student_memory(
        TINY,
        tp=2,
        pp=2,
        dp=1,
        micro_batch_tokens=10,
        num_microbatches=8,
        params_dtype="float32",
        distributed_optimizer=False,
    )
    assert tp2["params_grads_optimizer"] == (36992 + 6400) / 2 * 16  # one layer + one embedding per stage
    assert tp2["activations"] == 2 * 1 * 19200 / 2  # 2 micro-batches in flight x 1 layer, split by TP


def test_kv_cache_and_server_memory_by_hand():
    assert cap.kv_bytes_per_token(TINY, 1) == 2 * 2 * 2 * 16 * 2  # K+V x layers x kv heads x head dim x bf16
    assert cap.kv_bytes_per_token(TINY, 2) == 128
    assert cap.kv_bytes_per_token(TINY, 4) == 128  # KV heads replicated beyond their count
    mem = cap.server_memory(TINY, tp=1, hbm_gb=1.0, concurrent_seqs=3, seq_len=100, mem_fraction=0.5)
    assert mem["weights"] == 2 * TINY.num_params and mem["kv_needed"] == 3 * 100 * 256
    assert mem["kv_pool"] == 0.5e9 - 2 * TINY.num_params and mem["fits"] == 1.0


def test_hf_config_matches_transformers_parameter_count(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlad_megatron.tiny_models import save_tiny_model

    folder = save_tiny_model(tmp_path / "llama", "llama", tokenizer=False)
    arch, source = cap.load_arch(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert source.endswith("config.json")
    assert arch.num_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "folder, billions",
    [
        ("/m/Qwen3-8B", 8.19),
        ("/m/Qwen3-32B", 32.8),
        ("Qwen3-0.6B", 0.60),
        ("/x/Meta-Llama-3-70B-Instruct", 70.6),
        ("llama3-8b", 8.03),
    ],
)
def test_builtin_table_matches_published_sizes(folder, billions):
    arch, source = cap.load_arch(folder)
    assert "built-in" in source
    assert arch.num_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="matches no built-in architecture"):
        cap.load_arch("/nowhere/mystery-model")


def _student(arch, tp=1, pp=1, dp=1, tokens=4096):
    return cap.student_memory(arch, tp=tp, pp=pp, dp=dp, micro_batch_tokens=tokens, num_microbatches=16)["total"]


@pytest.mark.parametrize("name", sorted(cap.KNOWN_ARCHS))
def test_more_gpus_never_need_more_memory_per_gpu(name):
    arch = cap.KNOWN_ARCHS[name]
    for tp, pp in [(1, 1), (2, 1), (4, 1), (2, 2), (8, 2)]:
        for dp in (1, 2, 4, 8):
            base = _student(arch, tp, pp, dp)
            assert _student(arch, tp, pp, dp * 2) <= base
            assert _student(arch, tp * 2, pp, dp) <= base
            if arch.num_layers % (pp * 2) == 0:
                assert _student(arch, tp, pp * 2, dp) <= base


def test_bigger_models_never_need_less_memory():
    archs = sorted(cap.KNOWN_ARCHS.values(), key=lambda a: a.num_params)
    for small, big in itertools.pairwise(archs):
        if big.hidden_size >= small.hidden_size and big.num_layers >= small.num_layers:
            for tp in (1, 2, 8):
                assert _student(big, tp) >= _student(small, tp)
                assert (
                    cap.server_memory(big, tp=tp, hbm_gb=80, concurrent_seqs=8, seq_len=4096)["weights"]
                    >= cap.server_memory(small, tp=tp, hbm_gb=80, concurrent_seqs=8, seq_len=4096)["weights"]
                )
    wider = cap.Arch("w", 128, 2, 4, 2, 32, 256, 100, False)
    assert _student(wider) > _student(TINY)


def test_context_parallel_and_chunked_logits_memory_by_hand():
    base = {"tp": 1, "pp": 1, "dp": 4, "micro_batch_tokens": 10, "num_microbatches": 1}
    cp2 = cap.student_memory(TINY, **base, cp=2)
    assert cp2["activations"] == 2 * 19200 / 2  # each CP rank holds half of the packed row
    assert cp2["logits"] == 5 * 4 * 5 * 100
    chunked = cap.student_memory(TINY, **base, cp=2, logprob_chunk_size=3)
    assert chunked["logits"] == 5 * 4 * 3 * 100  # one chunk of 3 positions at a time
    assert cap.student_memory(TINY, **base, logprob_chunk_size=1000)["logits"] == 5 * 4 * 10 * 100


def test_plan_uses_context_parallelism_when_tensor_parallelism_is_not_enough():
    """~96K-token rows of an 8B student on 16 H100: TP stops at 8 (its KV heads) and no TP alone holds the row's
    activations without recompute; the recommended split adds CP=2 (preferred to recomputing every layer)."""
    cfg = load_config(RECIPE, ["rollout.max_new_tokens=96256", "train.micro_batch_tokens=8192"])
    arch, hbm = cap.KNOWN_ARCHS["qwen3-8b"], hw.GPUS["h100"].hbm_gb * hw.GB
    assert recommend_split(arch, cfg, 16, 8, hbm, 8192) == (8, 1, 2, 1, False)
    row = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    for tp in (1, 2, 4, 8):
        mem = cap.student_memory(
            arch,
            tp=tp,
            pp=1,
            dp=16 // tp,
            micro_batch_tokens=row,
            num_microbatches=1,
            logprob_chunk_size=cfg.model.logprob_chunk_size,
        )
        assert mem["total"] > hbm


def test_recommended_split_fits_and_prefers_fewer_model_parallel_gpus():
    cfg = load_config(RECIPE, ["launch.nodes=4"])
    hbm = hw.GPUS["h100"].hbm_gb * hw.GB
    tp, pp, cp, dp, _recompute = recommend_split(cap.KNOWN_ARCHS["qwen3-8b"], cfg, 16, 8, hbm, 2048)
    assert tp * pp * cp * dp == 16 and (cp == 1 or pp == 1)
    assert _student(cap.KNOWN_ARCHS["qwen3-8b"], tp, pp, dp, cfg.train.micro_batch_tokens) <= hbm
    # 70B on 8 GPUs of 80 GB cannot hold 70e9 * 6 bytes of weights + grads at TP*PP = 8
    assert recommend_split(cap.KNOWN_ARCHS["llama-3-70b"], cfg, 8, 8, hbm, 2048) is None


def _recipes():
    found = sorted(glob.glob("examples/qwen3_*/*.yaml"))
    return found or [RECIPE]


@pytest.mark.parametrize("recipe", _recipes())
def test_recipes_plan_without_error(recipe):
    cfg = load_config(recipe)
    plan = make_plan(cfg)
    assert plan["student_params"] > 0 and plan["seconds"]["total"] > 0
    assert all(v >= 0 for v in plan["seconds"].values())
    assert plan["recommended"] is not None, f"{recipe}: no student layout fits"


def test_more_rollout_nodes_generate_faster():
    fast = make_plan(load_config(RECIPE, ["launch.nodes=8", "launch.rollout_nodes=4"]))["seconds"]["generate"]
    slow = make_plan(load_config(RECIPE, ["launch.nodes=8", "launch.rollout_nodes=1"]))["seconds"]["generate"]
    assert fast < slow


def test_cli_prints_plan_and_json(capsys):
    assert rlad(["plan", RECIPE, "--nodes", "4", "--gpu", "h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["gpu"].startswith("H100") and set(plan["seconds"]) == {
        "generate",
        "teacher_score",
        "train",
        "weight_sync",
        "total",
    }
    assert rlad(["plan", RECIPE, "--nodes", "1", "--gpu", "h100"]) == 0
    assert "estimated step time" in capsys.readouterr().out
    assert (
        rlad(
            [
                "plan",
                RECIPE,
                "rollout.max_new_tokens=1024",
                "--nodes",
                "4",
                "--set",
                "data.max_prompt_length=64",
                "--json",
            ]
        )
        == 0
    )
    short = json.loads(capsys.readouterr().out)
    assert (short["mean_response"], short["mean_prompt"]) == (512, 16)  # 0.5 and 0.25 fills of the overrides
    assert rlad(["plan", RECIPE, "--gpu", "v100"]) == 2
    assert "launch.gpu='v100' is not allowed" in capsys.readouterr().err


def test_weight_sync_paths_by_hand():
    gpu = hw.GPUS["h100"]
    payload = 2 * TINY.num_params
    gather = 2 * payload / (3.35e12 * hw.HOST_EFFICIENCY)
    assert cap.sync_seconds(TINY, gpu, same_node=False) == pytest.approx(gather + payload / (50e9 * 0.8))
    assert cap.sync_seconds(TINY, gpu, same_node=True) == pytest.approx(gather + payload / (450e9 * 0.8))
    assert cap.sync_seconds(TINY, gpu, same_node=False, via="disk") == pytest.approx(gather + 2 * payload / 5e9)
    with pytest.raises(ValueError, match="unknown weight sync path"):
        cap.sync_seconds(TINY, gpu, same_node=False, via="rdma")
