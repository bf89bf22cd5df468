"""Offline dist-checkpoint conversion of a Qwen3-MoE student, against Megatron's own loader and saver (gloo).

`rlad convert hf-to-megatron` writes experts the way Megatron's `SequentialMLP` stores them: one key per
linear layer with a layer axis and an expert axis (`decoder.layers.mlp.experts.experts.linear_fc1.weight`
[L, E, 2F, H], gate and up rows as two chunks), an `_extra_state` object per (layer, expert), and the
pre-MLP norm under both layer specs' keys. Claims, at EP=1 (one process), EP=2 (two) and TP=2 x EP=2 (four, with
sequence parallelism, which Megatron's MoE layer needs under TP):
- Megatron loads the converted checkpoint and its logits equal transformers' within 1e-5;
- the checkpoint Megatron itself saves has the same tensor keys and global shapes as the converted one;
- `rlad convert megatron-to-hf` of Megatron's own checkpoint gives back the HF tensors bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlad_megatron.conversion import convert, dist_ckpt
from rlad_megatron.tiny_models import save_tiny_model

WORKER = Path(__file__).with_name("test_moe_dist_ckpt_worker.py")
LOGITS_ATOL = 1e-5


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("moe_ckpt")
    save_tiny_model(work / "hf", "qwen3_moe", seed=5, tokenizer=False, vocab_size=125)
    convert.hf_to_megatron(work / "hf", work / "mcore")
    return work


def _run(work: Path, tp: int, ep: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp * ep}", str(WORKER)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(work), str(tp), str(ep)], check=False, capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(work / f"result_tp{tp}_ep{ep}.pt")


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(str(f)).items()}


def _layout(folder: Path) -> dict[str, tuple[int, ...]]:
    reader = dist_ckpt.CheckpointReader(folder)
    return {k: tuple(v.size) for k, v in reader.tensors.items()}


@pytest.mark.dist
@pytest.mark.parametrize("tp,ep", [(1, 1), (1, 2), (2, 2)])
def test_converted_moe_checkpoint_loads_in_megatron_and_round_trips(converted, tp, ep):
    from test_moe_dist_ckpt_worker import IDS
    from transformers import AutoModelForCausalLM

    result = _run(converted, tp, ep)
    assert result["experts_per_rank"] == [4 // ep] * (tp * ep)  # each EP rank holds its own experts
    hf = AutoModelForCausalLM.from_pretrained(str(converted / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(torch.tensor(IDS)).logits
    assert reference.abs().max() > 0.1
    torch.testing.assert_close(result["logits"], reference, atol=LOGITS_ATOL, rtol=0)

    saved = converted / f"saved_tp{tp}_ep{ep}"
    converted_layout, saved_layout = _layout(converted / "mcore"), _layout(saved)
    assert saved_layout["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (2, 4, 64, 64)
    # the converter also writes the Transformer Engine spec's spelling of the pre-MLP norm
    assert converted_layout.pop("decoder.layers.pre_mlp_layernorm.weight") == (2, 64)
    vocab_keys = {"embedding.word_embeddings.weight", "output_layer.weight"}  # stored unpadded (125, not 128 rows)
    assert converted_layout.keys() == saved_layout.keys()
    assert all(converted_layout[k] == saved_layout[k] for k in saved_layout.keys() - vocab_keys)
    assert all(converted_layout[k] == (125, 64) and saved_layout[k] == (128, 64) for k in vocab_keys)

    back = convert.megatron_to_hf(saved, converted / f"from_saved_tp{tp}_ep{ep}", hf_config_dir=converted / "hf")
    original, restored = _hf_state(converted / "hf"), _hf_state(Path(back))
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)
