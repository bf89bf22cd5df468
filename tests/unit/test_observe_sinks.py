"""What the Observer writes besides metrics.jsonl: plain log lines off a terminal, and a W&B run (offline
mode here) holding the same scalars as tensorboard and no secret."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from rlad_megatron.config import LoggingConfig, WandbConfig, load_config, to_dict
from rlad_megatron.observe import Observer, log_line

SECRET = "sk-observe-9c1e77"
STEPS = [
    {"reward/mean": 0.25, "accuracy": 0.5, "loss": 1.5, "grad_norm": 0.75, "clip_frac_high": 0.125},
    {"reward/mean": 0.5, "accuracy": 0.75, "loss": float("nan"), "grad_norm": 0.5, "clip_frac_high": 0.0},
    {"reward/mean": 0.75, "accuracy": 1.0, "loss": 0.5, "grad_norm": 0.25, "clip_frac_high": 0.25},
]


def _logging(**overrides) -> LoggingConfig:
    wandb = WandbConfig(**overrides.pop("wandb", {}))
    return LoggingConfig(
        **{"tensorboard": False, "progress_bar": False, "rollout_samples": 0, **overrides}, wandb=wandb
    )


def test_log_lines_are_whole_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    long_metrics = {**STEPS[0], "zero_adv_group_frac": 0.5, "throughput/tokens_per_s": 12345.0, "time/step": 3.25}
    obs = Observer(tmp_path, _logging(progress_bar=True), num_steps=1000)
    obs.log_step(999, long_metrics)
    obs.close()
    expected = log_line(999, 1000, long_metrics)
    assert len(expected) > 100  # long enough that a terminal-width console would have wrapped it
    printed = capsys.readouterr()
    assert expected in (printed.out + printed.err).splitlines()


def _tensorboard_scalars(tb_dir: Path) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def _wandb_records(run_file: Path):
    """The records of a W&B .wandb file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose chunks
    (crc32, length, type; 1 = whole, 2/3/4 = first/middle/last) carry one protobuf Record each."""
    from wandb.proto import wandb_internal_pb2

    raw, block, pos, chunk, records = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = chunk + raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _wandb_scalars(run_dir: Path) -> dict[tuple[str, int], float]:
    import json

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    out = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            out.update({(k, items["_step"]): v for k, v in items.items() if not k.startswith("_")})
    return out


def test_wandb_offline_holds_the_tensorboard_scalars_and_no_secret(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setattr(sys, "argv", ["rlad", "train", "--set", f"rollout.api_key={SECRET}"])
    monkeypatch.setenv("RLAD_API_KEY", SECRET)
    cfg = load_config(None, [f"rollout.api_key={SECRET}"])
    logging_cfg = _logging(tensorboard=True, wandb={"project": "rlad-test", "mode": "offline"})
    obs = Observer(tmp_path, logging_cfg, num_steps=3, run_config=to_dict(cfg))
    obs.log_eval(0, {"avg@4": 0.125, "pass@4": 0.25})
    for step, metrics in enumerate(STEPS, start=1):
        obs.log_step(step, metrics)
    obs.log_eval(3, {"avg@4": 0.5, "pass@4": 0.75})
    obs.close()

    tensorboard = _tensorboard_scalars(tmp_path / "tb")
    assert ("loss", 2) not in tensorboard and ("eval/avg@4", 3) in tensorboard  # NaN skipped, evals kept
    assert _wandb_scalars(tmp_path) == pytest.approx(tensorboard)
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert files and [str(p) for p in files if SECRET.encode() in p.read_bytes()] == []

    run_id = (tmp_path / "wandb_id").read_text()
    Observer(tmp_path, logging_cfg, num_steps=3, start_step=3).close()  # a resumed run continues the same W&B run
    run_dirs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(run_dirs) >= 1 and all(run_id in p.name for p in run_dirs)  # W&B may suffix a second folder
