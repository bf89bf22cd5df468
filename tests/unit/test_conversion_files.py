"""Offline conversion on real files: HF -> Megatron dist checkpoint -> HF, the CLI, errors, streaming memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlad_megatron.conversion import convert
from rlad_megatron.conversion.cli import main as cli_main
from rlad_megatron.conversion.hf_io import (
    HFShardWriter,
    prune_steps,
    publish_step_folder,
    resolve_latest,
)
from rlad_megatron.tiny_models import save_tiny_model


def read_folder(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / file)))
    assert set(out) == set(index["weight_map"])
    return out


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llama", {"num_key_value_heads": 1}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {}),
    ],
)
def test_round_trip_through_dist_checkpoint_is_bit_exact(tmp_path, family, overrides):
    hf = save_tiny_model(tmp_path / "hf", family, **overrides)
    convert.hf_to_megatron(hf, tmp_path / "mcore")
    assert json.loads((tmp_path / "mcore" / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
    convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "back", max_shard_bytes=40_000)
    original, back = load_file(str(hf / "model.safetensors")), read_folder(tmp_path / "back")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert len(list((tmp_path / "back").glob("model-*.safetensors"))) > 1  # sharded
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).exists()


def test_dtype_on_export_and_import(tmp_path):
    hf = save_tiny_model(tmp_path / "hf", "qwen2")
    convert.hf_to_megatron(hf, tmp_path / "mcore", dtype=torch.bfloat16)
    convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "fp16", dtype=torch.float16)
    original, back = load_file(str(hf / "model.safetensors")), read_folder(tmp_path / "fp16")
    assert all(back[k].dtype == torch.float16 for k in back)
    assert all(torch.equal(back[k], original[k].to(torch.bfloat16).to(torch.float16)) for k in original)
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["dtype"] == "float16"


def test_bad_inputs_name_the_tensor(tmp_path):
    hf = save_tiny_model(tmp_path / "hf", "llama", tokenizer=False)
    weights = load_file(str(hf / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:, :-1].contiguous()
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' has shape \\(128, 63\\)"):
        convert.hf_to_megatron(hf, tmp_path / "a")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(hf / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="missing tensor.*model.layers.1.mlp.up_proj.weight"):
        convert.hf_to_megatron(hf, tmp_path / "b")


def test_checkpoint_not_matching_the_config_is_named(tmp_path):
    convert.hf_to_megatron(save_tiny_model(tmp_path / "hf", "llama"), tmp_path / "mcore")
    other = save_tiny_model(tmp_path / "other", "llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="decoder.layers.self_attention.linear_qkv.layer_norm_weight"):
        convert.megatron_to_hf(tmp_path / "mcore", tmp_path / "out", hf_config_dir=other)


def test_cli_both_directions_and_errors(tmp_path, capsys):
    hf = save_tiny_model(tmp_path / "hf", "qwen3")
    assert cli_main(["hf-to-megatron", "--hf", str(hf), "--out", str(tmp_path / "mc")]) == 0
    assert (
        cli_main(
            [
                "megatron-to-hf",
                "--ckpt",
                str(tmp_path / "mc"),
                "--out",
                str(tmp_path / "hf2"),
                "--dtype",
                "bf16",
                "--max-shard-size",
                "50KB",
            ]
        )
        == 0
    )
    assert read_folder(tmp_path / "hf2")["model.norm.weight"].dtype == torch.bfloat16
    assert cli_main(["megatron-to-hf", "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "x")]) == 1
    assert "not a Megatron dist checkpoint" in capsys.readouterr().err


def test_shard_writer_rejects_unplanned_order_and_publishes_atomically(tmp_path):
    entries = [("a", (2, 3), torch.float32), ("b", (4,), torch.bfloat16)]
    writer = HFShardWriter(tmp_path / "step_1.tmp", entries, max_shard_bytes=1 << 20)
    with pytest.raises(ValueError, match="'b'.*arrived where 'a'"):
        writer.add("b", torch.zeros(4, dtype=torch.bfloat16))
    writer.add("a", torch.ones(2, 3))
    with pytest.raises(ValueError, match="from 'b' on were never written"):
        writer.finish()
    writer.add("b", torch.arange(4).to(torch.bfloat16))
    assert writer.finish() == {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}
    final = publish_step_folder(tmp_path / "step_1.tmp", tmp_path / "step_1")
    assert resolve_latest(tmp_path) == final and not (tmp_path / "step_1.tmp").exists()
    for step in (0, 7, 12):
        (tmp_path / f"step_{step}").mkdir()
    # The newest two by step number stay, and so does the one `latest` names (step_1).
    assert [p.name for p in prune_steps(tmp_path, keep_last=2)] == ["step_0"]
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_1", "step_12", "step_7"]
    loaded = load_file(str(final / "model-00001-of-00001.safetensors"))
    assert torch.equal(loaded["b"], torch.arange(4).to(torch.bfloat16)) and torch.equal(loaded["a"], torch.ones(2, 3))


STREAMING_SCRIPT = textwrap.dedent("""
    import sys
    from rlad_megatron.conversion import convert
    def status_mb(field):  # VmHWM is this process's own peak (ru_maxrss would include the parent's)
        status = open("/proc/self/status").read()
        return int(status.split(field + ":")[1].split()[0]) / 1024
    base = status_mb("VmRSS")
    if sys.argv[1] == "to_megatron":
        convert.hf_to_megatron(sys.argv[2], sys.argv[3])
    else:
        convert.megatron_to_hf(sys.argv[2], sys.argv[3], max_shard_bytes=32 << 20)
    print(status_mb("VmHWM") - base)
""")


def _peak_growth_mb(*args) -> float:
    out = subprocess.run(
        [sys.executable, "-c", STREAMING_SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_streaming_peak_memory_stays_near_one_layer(tmp_path):
    """A 12-layer, ~210 MB model converts both ways with peak RSS growth far below the model size.

    Non-streaming code would hold the whole model (>= 210 MB); streaming holds a layer plus DCP's
    read buffers (about three copies of the largest tensor, 8 MB here).
    """
    layers, hidden, ffn, vocab = 12, 512, 2048, 4096
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": layers,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "dtype": "float32",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "rms_norm_eps": 1e-6,
    }
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(cfg))
    from rlad_megatron.conversion import tables
    from rlad_megatron.conversion.arch import arch_from_config

    arch = arch_from_config(cfg)
    entries = tables.hf_entries(arch, torch.float32, tables.iter_tensors(arch))
    save_file(
        {name: torch.randn(shape) for name, shape, _ in entries},
        str(hf / "model.safetensors"),
        metadata={"format": "pt"},
    )
    model_mb = sum(torch.Size(s).numel() * 4 for _, s, _ in entries) / 2**20
    layer_mb = (4 * hidden * hidden + 3 * hidden * ffn) * 4 / 2**20
    peaks = {
        "to_megatron_mb": _peak_growth_mb("to_megatron", hf, tmp_path / "mc"),
        "to_hf_mb": _peak_growth_mb("to_hf", tmp_path / "mc", tmp_path / "back"),
    }
    print(f"model {model_mb:.0f} MB, one layer {layer_mb:.1f} MB, peak RSS growth {peaks}")
    assert model_mb > 200 and layer_mb < 20
    assert peaks["to_megatron_mb"] < model_mb / 3, (peaks, model_mb)
    assert peaks["to_hf_mb"] < model_mb / 3, (peaks, model_mb)
    first_shard = min((tmp_path / "back").glob("model-00001-of-*.safetensors"))
    back = load_file(str(first_shard))
    original = load_file(str(hf / "model.safetensors"))
    assert len(back) > 0 and all(torch.equal(t, original[k]) for k, t in back.items())
