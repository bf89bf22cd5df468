"""Two teachers in one RLAD run on CPU: each prompt row names its teacher, each sample is scored by it.

The run is `train(cfg)` with `teachers: {math, code}` and `data.teacher_field=domain` over a jsonl file
whose rows name math, code or nobody (data.teacher_default=math). The saved rollouts are then re-scored
with each teacher's own engine: every sample's teacher log-probs must be its own teacher's and not the
other's. A row naming an unknown teacher stops the run before the rollout engine generates anything.
"""

from __future__ import annotations

import json
import math

import pytest
from train_helpers import TINY, digit_reward, subprocess_env

from rlad_megatron import train as train_mod
from rlad_megatron.config import load_config
from rlad_megatron.data.loader import DatasetError
from rlad_megatron.sample_sources import load_rollouts

ROWS = [
    {"prompt": "1+2=", "answer": "3", "domain": "math"},
    {"prompt": "print(7)", "answer": "7", "domain": "code"},
    {"prompt": "4+4=", "answer": "8", "domain": "math"},
    {"prompt": "9-5=", "answer": "4"},  # no domain: data.teacher_default (math)
]
FRAC = {"math": 3 / 4, "code": 1 / 4}


@pytest.fixture(autouse=True)
def _digit_reward(monkeypatch):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from rlad_megatron.tiny_models import save_tiny_model

    root = tmp_path_factory.mktemp("two_teachers")
    return {
        "student": save_tiny_model(root / "student", "llama", seed=1, **TINY),
        "math": save_tiny_model(root / "math", "llama", seed=2, **dict(TINY, hidden_size=48, intermediate_size=96)),
        "code": save_tiny_model(root / "code", "llama", seed=3, **TINY),
    }


def _config(run_dir, models, rows, extra=()):
    data = run_dir.parent / f"{run_dir.name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "seed=5",
            f"model.student={models['student']}",
            "algorithm.name=rlad",
            "algorithm.group_size=2",
            "rollout.kind=embedded",
            "rollout.max_new_tokens=6",
            f"teachers.math.model={models['math']}",
            "teachers.math.kind=embedded",
            f"teachers.code.model={models['code']}",
            "teachers.code.kind=embedded",
            f"data.train={data}",
            "data.template=plain",
            "data.teacher_field=domain",
            "data.teacher_default=math",
            "data.shuffle=false",
            "train.num_steps=2",
            f"train.prompts_per_step={len(rows)}",
            "train.lr=0.01",
            "train.save_rollouts=true",
            "checkpoint.interval=0",
            "checkpoint.save_hf=false",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            *extra,
        ],
    )


def _teacher_logprobs(model_dir, sample):
    """What this teacher's own engine gives for the sample, scored as the run scores a group."""
    from rlad_megatron.engines.embedded import EmbeddedEngine

    engine = EmbeddedEngine(str(model_dir))
    try:
        (out,) = engine.score([list(sample.prompt_ids) + list(sample.response_ids)], [len(sample.prompt_ids)])
    finally:
        engine.close()
    return out.logprobs


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b))


@pytest.mark.parametrize("stream", ["stream", "after_generate"])
def test_each_sample_is_scored_by_the_teacher_its_row_names(tmp_path, models, stream):
    cfg = _config(tmp_path / stream, models, ROWS, [f"train.stream_scoring={stream == 'stream'}"])
    history = train_mod.train(cfg)
    assert len(history) == 2
    for h in history:
        assert math.isfinite(h["loss"]) and h["skipped"] == 0.0
        for name, frac in FRAC.items():
            assert h[f"teacher/{name}/frac"] == pytest.approx(frac)
            assert math.isfinite(h[f"teacher/{name}/logprob_mean"])
            assert f"teacher/{name}/reward_mean" in h
    samples = load_rollouts(tmp_path / stream / "rollouts" / "step_1.jsonl")
    routed = {s.record["prompt"]: s.record["teacher"] for s in samples}
    assert routed == {"1+2=": "math", "print(7)": "code", "4+4=": "math", "9-5=": "math"}
    for name in FRAC:
        mine = [lp for s in samples if s.record["teacher"] == name for lp in s.teacher_logprobs]
        assert history[0][f"teacher/{name}/logprob_mean"] == pytest.approx(sum(mine) / len(mine))
    for sample in samples:
        own, other = sample.record["teacher"], {"math": "code", "code": "math"}[sample.record["teacher"]]
        assert sample.response_ids, "an empty response scores nothing; the check below would pass vacuously"
        assert _close(sample.teacher_logprobs, _teacher_logprobs(models[own], sample)), own
        assert not _close(sample.teacher_logprobs, _teacher_logprobs(models[other], sample)), other


def test_a_row_naming_an_unknown_teacher_stops_the_run_before_generation(tmp_path, models, monkeypatch):
    from rlad_megatron.engines.embedded import EmbeddedEngine
    from rlad_megatron.preflight import preflight

    generated = []
    monkeypatch.setattr(EmbeddedEngine, "generate", lambda self, *a, **k: generated.append(1))
    rows = [*ROWS[:2], {"prompt": "2*3=", "answer": "6", "domain": "physics"}]
    cfg = _config(tmp_path / "unknown", models, rows)
    problems, _ = preflight(cfg)  # `rlad train --dry-run` and the start of `rlad train` report it
    assert any(":3: field 'domain': unknown teacher 'physics'" in p for p in problems), problems
    with pytest.raises(DatasetError, match=r":3: field 'domain': unknown teacher 'physics'; the teachers are"):
        train_mod.train(cfg)
    assert generated == []


def test_a_teacher_served_over_http_scores_its_rows(tmp_path, models):
    """One teacher in-process, the other behind `rlad serve`: the HTTP one's samples carry its log-probs."""
    from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = launch_fleet(
        [embedded_server_cmd(str(models["code"]), port, threads=1)],
        [url],
        str(tmp_path / "logs"),
        120,
        env=subprocess_env(),
    )
    try:
        cfg = _config(
            tmp_path / "http",
            models,
            ROWS,
            ["teachers.code.kind=http", f"teachers.code.urls=[{url}]", "train.num_steps=1"],
        )
        (h,) = train_mod.train(cfg)
    finally:
        for p in procs:
            p.stop(grace_s=5)
    assert h["teacher/code/frac"] == pytest.approx(FRAC["code"])
    samples = load_rollouts(tmp_path / "http" / "rollouts" / "step_1.jsonl")
    code = [s for s in samples if s.record["teacher"] == "code"]
    assert code and all(_close(s.teacher_logprobs, _teacher_logprobs(models["code"], s), 1e-4) for s in code)


def test_rlad_train_dry_run_checks_each_teachers_tokenizer(tmp_path, models, capsys):
    """`rlad train --dry-run`: the plan names both teachers; a teacher with another vocabulary is refused by name."""
    from rlad_megatron.data.tokenizer import build_char_tokenizer
    from rlad_megatron.tiny_models import save_tiny_model
    from rlad_megatron.train_cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\n")
    args = [
        f"--config={recipe}",
        f"model.student={models['student']}",
        "algorithm.name=rlad",
        "rollout.kind=embedded",
        f"teachers.math.model={models['math']}",
        "teachers.math.kind=embedded",
        f"teachers.code.model={models['code']}",
        "teachers.code.kind=embedded",
        "data.train=task:addition",
        "data.task_kwargs.size=8",
        "data.teacher_field=domain",
        "data.teacher_default=math",
    ]
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"math={models['math']}, code={models['code']} (by row field domain, default math)" in out
    other = save_tiny_model(tmp_path / "other", "llama", seed=4, tokenizer=False, vocab_size=120, **TINY)
    build_char_tokenizer(other, alphabet="0123456789+=# abcdefghijklmnop")  # a different vocabulary
    assert main([*args, f"teachers.code.model={other}", "--dry-run"]) == 1
    problems = [line.strip()[2:] for line in capsys.readouterr().err.splitlines() if line.strip().startswith("- ")]
    assert len(problems) == 1 and problems[0].startswith("teachers.code: ") and "tokenizer" in problems[0].lower()
