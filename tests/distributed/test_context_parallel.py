"""Context parallelism on 4 gloo processes (one torchrun launch): CP=2 with DP=2, with TP=2, with TP=2 + SP.

`test_context_parallel_worker.py` measures; the reference is the single-process forward/backward of the
full batch (padded layout, torch log_softmax) on the TP=1 model. Samples have uneven lengths, so every
sequence is padded to a multiple of 2 x CP and the micro-batches differ in length.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun_worker import run_worker

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("test_context_parallel_worker.py")
GRAD_TOL, LOSS_TOL, LP_TOL = 1e-6, 1e-6, 1e-5


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_worker(WORKER, 4, tmp_path_factory.mktemp("cp") / "results.json")


def test_samples_have_uneven_lengths_not_multiples_of_2cp(measured):
    lengths = measured["sequence_lengths"]
    assert len(set(lengths)) > 2
    assert any(n % 4 for n in lengths)


@pytest.mark.parametrize("layout", ["cp2_dp2", "cp2_dp2_unchunked", "cp2_tp2", "cp2_tp2_sp"])
def test_context_parallel_loss_grads_and_logprobs_match_single_process(measured, layout):
    assert measured["ref_grad_max"] > 1e-2, "reference gradients are trivially small"
    result = measured[layout]
    assert result["cp_size"] == 2
    assert result["loss"] < LOSS_TOL
    assert result["grad"] < GRAD_TOL
    assert result["lp"] < LP_TOL
