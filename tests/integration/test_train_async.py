"""train.max_staleness=1 through `train(cfg)`: the next step's samples are generated on rank 0's background
thread while the current step trains, the engine takes new weights only between generations, the samples are
one update old (staleness metrics, weights versions in the saved rollouts, a real rollout / trainer gap) and
the truncated importance weights are logged; the student still learns."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import Future

import pytest
import torch
from train_helpers import digit_reward, run_config

from rlad_megatron import train as train_mod

NUM_STEPS = 4


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


class EngineWatch:
    """Wraps the embedded engine: how many generate calls ran at once, and any weight update during one."""

    def __init__(self, monkeypatch):
        from rlad_megatron.engines.embedded import EmbeddedEngine

        self.lock, self.running, self.most_at_once, self.updates_while_generating = threading.Lock(), 0, 0, 0
        generate, update = EmbeddedEngine.generate, EmbeddedEngine.update_weights

        def watched_generate(engine, *args, **kwargs):
            with self.lock:
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                time.sleep(0.05)  # widen the window in which a concurrent sync or eval would be caught
                return generate(engine, *args, **kwargs)
            finally:
                with self.lock:
                    self.running -= 1

        def watched_update(engine, **kwargs):
            with self.lock:
                self.updates_while_generating += self.running > 0
            return update(engine, **kwargs)

        monkeypatch.setattr(EmbeddedEngine, "generate", watched_generate)
        monkeypatch.setattr(EmbeddedEngine, "update_weights", watched_update)


def _phases(monkeypatch) -> list[tuple[str, int, float, float, str]]:
    """(what, step, start, end, thread) of every sample collection and every optimizer step."""
    from rlad_megatron.backends.megatron.trainer import MegatronTrainer
    from rlad_megatron.sample_sources import StudentRollouts

    spans: list[tuple[str, int, float, float, str]] = []
    collect, train_step = StudentRollouts.collect, MegatronTrainer.train_step

    def timed_collect(source, ctx, step):
        start = time.perf_counter()
        out = collect(source, ctx, step)
        spans.append(("collect", step, start, time.perf_counter(), threading.current_thread().name))
        return out

    def timed_train_step(trainer, samples, advantages, step, **kwargs):
        start = time.perf_counter()
        out = train_step(trainer, samples, advantages, step, **kwargs)
        spans.append(("train", step, start, time.perf_counter(), threading.current_thread().name))
        return out

    monkeypatch.setattr(StudentRollouts, "collect", timed_collect)
    monkeypatch.setattr(MegatronTrainer, "train_step", timed_train_step)
    return spans


def _weights_changed(cfg) -> bool:
    from rlad_megatron.conversion.hf_io import resolve_latest
    from rlad_megatron.engines.model import iter_safetensors

    before = dict(iter_safetensors(cfg.model.student))
    after = dict(iter_safetensors(resolve_latest(f"{cfg.run_dir}/hf")))
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("algorithm", ["grpo", "rlad"])
def test_max_staleness_1_overlaps_generation_with_training_on_one_update_old_samples(tmp_path, monkeypatch, algorithm):
    watch = EngineWatch(monkeypatch)
    spans = _phases(monkeypatch)
    cfg = run_config(
        tmp_path / algorithm,
        algorithm,
        [
            f"train.num_steps={NUM_STEPS}",
            "train.max_staleness=1",
            "train.save_rollouts=true",
            "data.eval=task:addition",
            "eval.interval=2",
            "eval.max_prompts=2",
            "eval.num_samples=1",
            "checkpoint.interval=2",
        ],
    )
    history = train_mod.train(cfg)
    # The engine never took weights, nor served an eval, while it generated.
    assert watch.updates_while_generating == 0 and watch.most_at_once == 1

    # Step 1 is generated with the initial weights and trained at once; every later step was generated with
    # the weights one update older than the trainer's.
    assert [h["staleness/mean"] for h in history] == [0.0, 1.0, 1.0, 1.0]
    assert [h["staleness/max"] for h in history] == [0.0, 1.0, 1.0, 1.0]
    versions = [
        {json.loads(line)["weights_version"] for line in (tmp_path / algorithm / "rollouts" / f"step_{n}.jsonl").open()}
        for n in range(1, NUM_STEPS + 1)
    ]
    assert versions == [{0}, {0}, {1}, {2}]
    # ... and they really are: the engine's log-probs differ from the trainer's (lr=0.01 moved the weights),
    # which a synchronous run keeps below 1e-6 (test_train_algorithms.py).
    assert all(h["kl/rollout_vs_old_k3"] > 1e-5 for h in history[1:])
    for h in history:
        assert 0.0 < h["tis/weight_mean"] < 2.0 and 0.0 <= h["tis/truncated_frac"] <= 1.0
    assert cfg.algorithm.tis_cap == 2.0  # on by default off-policy

    # Generation of step N+1 ran on the prefetch thread while step N's optimizer step ran.
    collects = {step: (start, end, thread) for what, step, start, end, thread in spans if what == "collect"}
    trains = {step: (start, end) for what, step, start, end, _ in spans if what == "train"}
    for step in range(2, NUM_STEPS + 1):
        start, _end, thread = collects[step]
        assert thread.startswith("rlad-prefetch"), (step, thread)
        assert start < trains[step - 1][1], f"step {step}'s generation started after step {step - 1} trained"

    # The student still learns: finite losses, no skipped update, gradients, moved weights.
    for h in history:
        assert math.isfinite(h["loss"]) and h["skipped"] == 0.0
        assert h["grad_norm"] > 0.0 or h["zero_adv_group_frac"] == 1.0
    assert _weights_changed(cfg)


def test_a_failed_prefetch_is_not_checkpointed_and_its_step_is_generated_again():
    """If the background generation failed, the checkpoint keeps the prompt sampler as it was before that
    generation drew its prompts (a resumed run generates the step anew) and no samples."""
    failed: Future = Future()
    failed.set_exception(RuntimeError("server gone"))
    before = {"epoch": 0, "position": 4, "seed": 7, "shuffle": 1, "num_records": 32}
    state = train_mod.prefetch_state(train_mod.Prefetch(3, 1, before, failed))
    assert state == {"sampler": before}
