"""Parallel maths of the Megatron backend on 2 gloo processes (one torchrun launch, ~30-45 s).

`test_megatron_worker.py` runs every layout in one 2-process world and writes what it measured;
the tests below assert on it. Reference: a plain single-process forward/backward of the full
batch (padded layout, torch log_softmax) on the TP=1 model. Tolerances (float32): losses 1e-6,
gradients 1e-6 absolute (reference gradients reach ~0.3), log-probs 1e-5, HF logits 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun_worker import run_worker

pytestmark = pytest.mark.dist

WORKER = Path(__file__).with_name("test_megatron_worker.py")
GRAD_TOL, LOSS_TOL, LP_TOL = 1e-6, 1e-6, 1e-5


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_worker(WORKER, 2, tmp_path_factory.mktemp("megatron") / "results.json")


@pytest.mark.parametrize("layout", ["dp2", "tp2", "tp2_sp", "pp2"])
def test_loss_and_grads_match_single_process(measured, layout):
    assert measured["ref_grad_max"] > 1e-2, "reference gradients are trivially small"
    assert measured[layout]["loss"] < LOSS_TOL
    assert measured[layout]["grad"] < GRAD_TOL


def test_vocab_parallel_logprobs_entropy_topk_match_full_log_softmax(measured):
    assert measured["vp_value_diff"] < 2e-5
    assert measured["vp_grad_diff"] < 2e-5
    assert measured["vp_num_padded_cols"] == 3  # vocab 125 padded to 128
    assert measured["vp_grad_padded_cols"] == 0.0


def test_chunked_logprobs_match_whole_logits_at_tp2(measured):
    assert measured["chunked_grad_max"] > 1e-2
    assert measured["chunked_value_diff"] < 1e-6
    assert measured["chunked_grad_diff"] < 1e-6


def test_packed_equals_padded_logprobs(measured):
    assert measured["dp_packed_vs_padded_lp"] < LP_TOL
    assert measured["tp2_lp"] < LP_TOL


def test_distributed_optimizer_step_equals_plain_step(measured):
    assert measured["optimizer_step_size"] > 1e-3  # the step moved the weights
    assert measured["dist_opt_step_diff"] < 1e-6


def test_distributed_optimizer_checkpoint_before_first_step(measured):
    """Saved before any update (no optimizer state): loading it into a trainer that has stepped
    restores the step-0 model and a fresh optimizer, whose step equals a never-saved fresh one's."""
    assert measured["dist_opt_step0_model_diff"] == 0.0
    assert measured["dist_opt_step0_num_states"] == 0
    assert measured["dist_opt_step0_resumed_diff"] < 1e-6


def test_checkpoint_reshards_across_layouts(measured):
    assert measured["tp2_to_tp1_lp"] < LP_TOL
    assert measured["tp2_to_pp2_lp"] < LP_TOL
    assert measured["pp2_to_pp1_lp"] < LP_TOL
    assert measured["latest_step"] == 2 and measured["latest_extra"] == {"data_position": 2}


def test_interrupted_save_keeps_previous_checkpoint(measured):
    assert measured["crash_raised"]
    assert measured["after_crash_latest"] == "step_2"
    assert measured["after_crash_tmp_exists"]
    assert measured["after_crash_load_step"] == 2
    assert measured["after_prune"] == ["latest", "step_2", "step_4"]  # keep_last=2, stale tmp removed


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_megatron_model_matches_hf_forward(measured, family):
    assert measured[f"hf_logits_{family}"] < 1e-5
    hf_params, megatron_params = measured[f"hf_params_{family}"]
    assert hf_params == megatron_params


def test_non_finite_loss_skips_the_update(measured):
    assert measured["nan_skipped"] == 1.0
    assert measured["nan_param_change"] == 0.0
