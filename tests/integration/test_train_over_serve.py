"""A training run with the in-process engine and the same run against a `rlad serve` server give the same metrics.

The student's context is short (64 positions) and `eval.max_new_tokens` asks for more than it leaves after
the prompt, so evaluation only runs to the end because the budget is cut to the context left (SGLang's
rule, engines/request_rules.py) on both paths. The server run uses the distributed weight sync over the
wire (gloo), so its step-2 samples come from the weights the trainer sent after step 1.
"""

from __future__ import annotations

import math

import pytest
from train_helpers import TINY, subprocess_env

from rlad_megatron import train as train_mod
from rlad_megatron.config import load_config
from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet

CONTEXT = 64
EVAL_MAX_NEW = 200  # more than any prompt leaves of the context
TOL = 1e-4  # fp32 rounding of sampled log-probs across batch sizes (~1e-6) carried through a loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from rlad_megatron.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("serve_train")
    student = save_tiny_model(root / "student", "llama", seed=1, max_position_embeddings=CONTEXT, **TINY)
    teacher = save_tiny_model(
        root / "teacher", "llama", seed=2, max_position_embeddings=CONTEXT, **dict(TINY, hidden_size=48)
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = launch_fleet(
        [embedded_server_cmd(str(student), port, threads=1)], [url], str(root / "logs"), 120, env=subprocess_env()
    )
    yield root, student, teacher, url
    for p in procs:
        p.stop(grace_s=5)


def _run(root, student, teacher, name: str, rollout: list[str]) -> tuple[list[dict], list[dict]]:
    from rlad_megatron.observe import read_metrics

    run_dir = root / name
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "seed=3",
            f"model.student={student}",
            f"model.teacher={teacher}",
            "algorithm.name=opd",
            "algorithm.group_size=2",
            "teacher.kind=embedded",
            "rollout.max_new_tokens=6",
            "data.train=task:addition",
            "data.eval=task:addition",
            "data.task_kwargs.size=16",
            "train.num_steps=2",
            "train.prompts_per_step=2",
            "train.lr=0.05",
            "eval.interval=2",
            "eval.num_samples=2",
            "eval.max_prompts=3",
            f"eval.max_new_tokens={EVAL_MAX_NEW}",
            "eval.temperature=1.0",
            "checkpoint.interval=0",
            "checkpoint.save_hf=false",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            *rollout,
        ],
    )
    history = train_mod.train(cfg)
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval"]
    return history, evals


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOL, abs_tol=TOL)


def test_embedded_and_rlad_serve_runs_give_the_same_metrics(setup):
    root, student, teacher, url = setup
    embedded, embedded_evals = _run(root, student, teacher, "embedded", ["rollout.kind=embedded"])
    served, served_evals = _run(
        root,
        student,
        teacher,
        "served",
        ["rollout.kind=http", f"rollout.urls=[{url}]", "rollout.sync=distributed", "rollout.sync_host=127.0.0.1"],
    )
    assert len(embedded) == len(served) == 2
    timing = ("time", "throughput", "tokens_per_s", "mem", "sync", "_s")
    for step, (a, b) in enumerate(zip(embedded, served), start=1):
        keys = sorted(k for k in a if not any(t in k for t in timing))
        assert keys and set(keys) <= set(b), step
        differ = {k: (a[k], b[k]) for k in keys if not _close(a[k], b[k])}
        assert not differ, f"step {step}: {differ}"
    # the eval ran at step 0 and at the end on both paths, with budgets cut to the context left
    assert [e["step"] for e in embedded_evals] == [e["step"] for e in served_evals] == [0, 2]
    for a, b in zip(embedded_evals, served_evals):
        assert {k: v for k, v in a.items() if k.startswith("eval/")} == {
            k: v for k, v in b.items() if k.startswith("eval/")
        }
        assert 0 < a["eval/mean_response_length"] < CONTEXT


def test_eval_interval_zero_runs_no_evaluation(setup):
    root, student, teacher, _ = setup
    history, evals = _run(
        root,
        student,
        teacher,
        "no_eval",
        ["rollout.kind=embedded", "train.num_steps=1", "eval.interval=0", "eval.max_new_tokens=4"],
    )
    assert len(history) == 1 and evals == []
