"""API keys never reach disk or the console: a tiny run against two `rlad serve` servers that demand keys,
the rollout key given in the config and the teacher key in the environment, then every byte the run wrote
(config.yaml, metrics, tensorboard events, the W&B offline run, samples, saved rollouts, checkpoints, HF
export), everything it printed and the servers' logs are searched for the keys.
Also the HTTP client: an unreachable server's error names the URL, never the key."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
from train_helpers import digit_reward, make_models, run_config, subprocess_env

from rlad_megatron import train as train_mod
from rlad_megatron.engines.fleet import embedded_server_cmd, free_port, launch_fleet

CONFIG_KEY = "cfgkey-7f3a91c0d2"
TEACHER_ENV_KEY = "envkey-teacher-c41d"
SECRETS = (CONFIG_KEY, TEACHER_ENV_KEY)


def _files_holding(root: Path, secrets) -> list[str]:
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        hits += [f"{path.relative_to(root)}: {s}" for s in secrets if s.encode() in data]
    return hits


def _keyed_server(model: Path, key: str, log_dir: Path):
    """One `rlad serve` that answers only requests bearing `key` (it reads its own key from RLAD_API_KEY)."""
    url = f"http://127.0.0.1:{(port := free_port())}"
    cmd = embedded_server_cmd(str(model), port, threads=1)
    (proc,) = launch_fleet(
        [cmd],
        [url],
        str(log_dir),
        timeout_s=120,
        env={**subprocess_env(), "RLAD_API_KEY": key},
        headers={"Authorization": f"Bearer {key}"},
    )
    return url, proc


@pytest.mark.slow  # two servers and one tiny RLAD step with checkpoint, export, tensorboard and W&B: ~40 s
def test_api_keys_are_never_written_by_a_run(tmp_path, monkeypatch, capfd, caplog):
    from rlad_megatron import rewards

    student, teacher = make_models(tmp_path)
    servers = [
        _keyed_server(student, CONFIG_KEY, tmp_path / "student_logs"),
        _keyed_server(teacher, TEACHER_ENV_KEY, tmp_path / "teacher_logs"),
    ]
    try:
        (student_url, _), (teacher_url, _) = servers
        for url in (student_url, teacher_url):  # without its key a server refuses: the run must really send them
            assert httpx.post(url + "/generate", json={"input_ids": [1, 2]}, timeout=30).status_code == 401
        monkeypatch.setattr(rewards, "build_reward_fn", lambda reward_cfg, data_cfg: digit_reward)
        monkeypatch.setenv("RLAD_TEST_TEACHER_KEY", TEACHER_ENV_KEY)
        caplog.set_level(logging.DEBUG)
        cfg = run_config(
            tmp_path / "run",
            "rlad",
            [
                "train.num_steps=1",
                "checkpoint.interval=1",
                "logging.tensorboard=true",
                "logging.wandb.project=rlad-secrets",
                "logging.wandb.mode=offline",
                "train.save_rollouts=true",
                "rollout.kind=http",
                f"rollout.urls=[{student_url}]",
                f"rollout.api_key={CONFIG_KEY}",
                "rollout.sync_host=127.0.0.1",
                "teacher.kind=http",
                f"teacher.urls=[{teacher_url}]",
                "teacher.api_key_env=RLAD_TEST_TEACHER_KEY",
            ],
        )
        assert cfg.rollout.api_key == CONFIG_KEY  # the key really is in the live config
        metrics = train_mod.train(cfg)
        assert metrics and "teacher_log_ratio_mean" in metrics[-1]  # the HTTP teacher scored the samples
        assert (
            httpx.get(
                student_url + "/model_info", headers={"Authorization": f"Bearer {CONFIG_KEY}"}, timeout=30
            ).json()["weight_version"]
            == "1"
        )  # the step's weights reached the server
    finally:
        for _, proc in servers:
            proc.stop(grace_s=5)

    run_dir = Path(cfg.run_dir)
    written = {p.relative_to(run_dir).parts[0] for p in run_dir.rglob("*") if p.is_file()}
    # The scan covers every kind of output the run writes.
    assert {"config.yaml", "tb", "wandb", "rollouts", "checkpoints"} <= written, written
    assert "<redacted>" in (run_dir / "config.yaml").read_text()
    assert _files_holding(run_dir, SECRETS) == []
    assert _files_holding(tmp_path / "student_logs", SECRETS) + _files_holding(tmp_path / "teacher_logs", SECRETS) == []
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
