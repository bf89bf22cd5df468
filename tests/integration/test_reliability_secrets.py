"""API keys never reach disk or the console: a tiny run with keys given in the config and in the
environment, then every byte the run wrote (config.yaml, metrics, tensorboard events, samples,
saved rollouts, checkpoints, HF export) and everything it printed is searched for the keys.
Also the HTTP client: an unreachable server's error names the URL, never the key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from train_helpers import digit_reward, run_config

from rlad_megatron import train as train_mod

CONFIG_KEY = "cfgkey-7f3a91c0d2"
ROLLOUT_ENV_KEY = "envkey-rollout-5be2"
TEACHER_ENV_KEY = "envkey-teacher-c41d"
SECRETS = (CONFIG_KEY, ROLLOUT_ENV_KEY, TEACHER_ENV_KEY)


def _files_holding(root: Path, secrets) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.relative_to(root)}: {s}" for s in secrets if s.encode() in data]
    return hits


@pytest.mark.slow  # one tiny RLAD step with checkpoint, export and tensorboard: ~20 s on 2 shared cores
def test_api_keys_are_never_written_by_a_run(tmp_path, monkeypatch, capfd, caplog):
    from rlad_megatron import rewards

    monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)
    monkeypatch.setenv("RLAD_API_KEY", ROLLOUT_ENV_KEY)
    monkeypatch.setenv("RLAD_TEST_TEACHER_KEY", TEACHER_ENV_KEY)
    caplog.set_level(logging.DEBUG)
    cfg = run_config(
        tmp_path / "run",
        "rlad",
        [
            "train.num_steps=1",
            "checkpoint.interval=1",
            "logging.tensorboard=true",
            "train.save_rollouts=true",
            f"rollout.api_key={CONFIG_KEY}",
            "teacher.api_key_env=RLAD_TEST_TEACHER_KEY",
        ],
    )
    assert cfg.rollout.api_key == CONFIG_KEY  # the key really is in the live config
    train_mod.train(cfg)

    run_dir = Path(cfg.run_dir)
    written = {p.relative_to(run_dir).parts[0] for p in run_dir.rglob("*") if p.is_file()}
    # The scan covers every kind of output the run writes.
    assert {"config.yaml", "tb", "rollouts", "checkpoints"} <= written, written
    assert "<redacted>" in (run_dir / "config.yaml").read_text()
    assert _files_holding(run_dir, SECRETS) == []
    out, err = capfd.readouterr()
    printed = out + err + caplog.text
    assert printed.strip()  # the run did print (plan, progress), and none of it holds a key
    assert [s for s in SECRETS if s in printed] == []


def test_http_client_errors_do_not_echo_the_key(caplog):
    from rlad_megatron.engines.base import EngineError, SamplingParams
    from rlad_megatron.engines.client import HttpEngine
    from rlad_megatron.engines.fleet import free_port

    caplog.set_level(logging.DEBUG)
    engine = HttpEngine(
        [f"http://127.0.0.1:{free_port()}"], api_key=CONFIG_KEY, request_timeout_s=2.0, max_retries=1, cooldown_s=0.1
    )
    try:
        with pytest.raises(EngineError) as info:
            engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    finally:
        engine.close()
    assert "127.0.0.1" in str(info.value)
    assert CONFIG_KEY not in str(info.value) and CONFIG_KEY not in repr(info.value) and CONFIG_KEY not in caplog.text
