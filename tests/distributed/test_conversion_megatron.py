"""Converted checkpoints and live exports against Hugging Face transformers (gloo, 1-2 processes).

For each layout the worker (test_conversion_worker.py) builds the student with the backend's
`build_model`, loads (a) the dist checkpoint written by `conversion.convert.hf_to_megatron` and
(b) the HF folder directly, and exports the live sharded model. Here we compare the full logits
with `AutoModelForCausalLM` on the same ids, reload the exported folder with `from_pretrained`,
and convert the checkpoint Megatron itself saved at that layout back to HF.

Tolerance: fp32 everywhere; TP=2 sums partial matmuls in another order, so logits agree to
1e-5 absolute (measured: 0.0 at TP=1 and PP=2, 1.6e-7 at TP=2); weights round-trip bit-exact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlad_megatron.conversion import convert, tables
from rlad_megatron.conversion.arch import arch_from_config
from rlad_megatron.tiny_models import save_tiny_model

WORKER = Path(__file__).with_name("test_conversion_worker.py")
LOGITS_ATOL = 1e-5
LAYOUTS = [  # (family, tp, pp, overrides): GQA 4/2; qwen2 = QKV bias, qwen3 = QK-norm; tied at TP=2 and PP=2
    ("llama", 1, 1, {}),
    ("qwen2", 2, 1, {"tie_word_embeddings": True}),
    ("qwen3", 1, 2, {}),
]


def _run_worker(work: Path, family: str, tp: int, pp: int) -> dict:
    nproc = tp * pp
    # --standalone: torchrun picks a free rendezvous port itself (no race with other test processes).
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(WORKER),
        str(work),
        family,
        str(tp),
        str(pp),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(work / f"result_tp{tp}_pp{pp}.pt")


def _hf_logits(folder) -> torch.Tensor:
    from test_conversion_worker import IDS
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


def _state(folder):
    from safetensors.torch import load_file

    out = {}
    for file in Path(folder).glob("*.safetensors"):
        out.update(load_file(str(file)))
    return out


@pytest.mark.dist
@pytest.mark.parametrize("family,tp,pp,overrides", LAYOUTS)
def test_megatron_matches_transformers_and_exports_round_trip(tmp_path, family, tp, pp, overrides):
    hf = save_tiny_model(tmp_path / "hf", family, seed=3, **overrides)
    convert.hf_to_megatron(hf, tmp_path / "mcore")
    result = _run_worker(tmp_path, family, tp, pp)

    reference = _hf_logits(hf)
    assert reference.abs().max() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(result["logits_ckpt"], reference, atol=LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(result["logits_hf"], reference, atol=LOGITS_ATOL, rtol=0)

    exported = Path(result["folder"])
    assert (
        exported == tmp_path / "export" / "step_1" and (tmp_path / "export" / "latest").read_text().strip() == "step_1"
    )
    torch.testing.assert_close(_hf_logits(exported), result["logits_hf"], atol=LOGITS_ATOL, rtol=0)
    original, back = _state(hf), _state(exported)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)

    # Buckets: every rank of a stage yields the same names; together the stages cover the model once.
    names = [n for rank_buckets in result["buckets"][::tp] for b in rank_buckets for n, _ in b]
    assert sorted(names) == sorted(original) and result["buckets"][0] == result["buckets"][tp - 1]
    assert max(result["bucket_sizes"]) <= 64 << 10 or len(result["buckets"][0]) == 1
    # to_first=True: TP rank 0 of each stage gets every tensor of its stage, the other TP ranks none.
    stage_names = [sorted(n for b in rank_buckets for n, _ in b) for rank_buckets in result["buckets"]]
    for rank, names_first in enumerate(result["firsts"]):
        assert sorted(names_first) == (stage_names[rank] if rank % tp == 0 else [])

    # pp_group=: the whole model, in table order, on global rank 0 only (stage 1 sends its buckets).
    assert result["whole_order"] == tables.expected_hf_names(arch_from_config(hf))
    assert all(torch.equal(result["whole"][k], original[k]) for k in original)
    assert result["whole_counts"][1:] == [0] * (tp * pp - 1)

    convert.megatron_to_hf(tmp_path / "saved", tmp_path / "from_saved", hf_config_dir=hf)
    from_saved = _state(tmp_path / "from_saved")
    assert all(torch.equal(from_saved[k], original[k]) for k in original)
