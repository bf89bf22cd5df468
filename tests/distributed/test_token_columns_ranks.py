"""Per-token columns between trainer ranks (2 gloo processes, data parallel 2, two minibatches): rank 1 holds
the ids and log-probs of only the samples its data-parallel rank trains on, the values it trains on are exactly
the whole samples', and the step's advantages, losses, metrics and gradients equal those of samples pickled whole to
every rank (the previous path), for OPD (teacher log-probs in the advantages), RLAD (in the loss) and GKD
(top-k). `test_token_columns_worker.py` runs the ranks; this side asserts on what it wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
from torchrun_worker import run_worker

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("test_token_columns_worker.py")
ALGORITHMS = ("opd", "rlad", "gkd")
COLUMNS = [
    "prompt_ids",
    "response_ids",
    "rollout_logprobs",
    "teacher_logprobs",
    "teacher_topk_ids",
    "teacher_topk_logprobs",
]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_worker(WORKER, 2, tmp_path_factory.mktemp("columns") / "results.json")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rank_1_holds_only_its_data_parallel_share(measured, algorithm):
    rank0, rank1 = measured[algorithm]
    everything = list(range(rank0["num_samples"]))
    assert rank0["held"] == {name: everything for name in COLUMNS}  # rank 0 made the samples: it keeps them all
    trained, ids = rank1["trained"], sorted(set(rank1["trained"]) | set(rank1["scored"]))
    assert 0 < len(trained) < rank1["num_samples"]
    # the token ids of the samples it computes log-probs or trains on; every other column of those it trains on
    assert rank1["held"] == {name: ids if name.endswith("_ids") and "topk" not in name else trained for name in COLUMNS}
    assert rank1["absent_names"] == sorted(COLUMNS)  # every column of the other rank's samples stayed behind
    assert rank1["lengths_kept"] and rank1["exact"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_losses_metrics_advantages_and_gradients_equal_the_whole_samples_path(measured, algorithm):
    for rank in measured[algorithm]:
        assert rank["grads_nonzero"]
        assert rank["metrics_equal"] and rank["grads_equal"] and rank["held_advantages_equal"]
    unheld = measured[algorithm][1]["unheld_advantages"]
    # OPD's advantages read the teacher log-probs: rank 1 has none for samples it does not train on
    assert unheld == (["NoneType"] if algorithm == "opd" else ["list"])
