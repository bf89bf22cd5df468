"""What a run shows while it trains: metrics jsonl, tensorboard, a progress bar, one log line per step.

Idea: the loop hands one flat dict of floats per step (`Observer.log_step`) and per eval
(`Observer.log_eval`); this module fans it out to
  - `<run_dir>/metrics.jsonl`  one JSON object per step / eval (`rlad report` reads it; the resume
                               test compares it), rewritten on resume so steps never repeat,
  - `<run_dir>/tb/`            tensorboard scalars (same names, `/` groups the panels),
  - W&B (optional)             the same scalars (`logging.wandb`; offline mode writes <run_dir>/wandb),
  - the console                a concise log line per step; on a terminal also a rich progress bar with
                               ETA and live reward (in a log file the lines are plain and never wrapped),
  - `<run_dir>/samples.jsonl`  a few decoded rollouts per step, for reading.
`PhaseTimer` measures the phases of a step (generate / score / train / sync) into `time/<phase>`.

Metric names (docs/training.md has the glossary): `reward/mean`, `reward/std`, `accuracy`,
`response_length/mean`, `time/*`, `throughput/tokens_per_s`, plus whatever the objective and
the trainer return (clip fractions, TRRD metrics, KL estimates, entropy, `grad_norm`, `lr`).
Only rank 0 observes; other ranks get a `NullObserver`.
Left out: mlflow, histograms.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

# Shown in the one-line summary, in this order, when present.
_LOG_LINE_KEYS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("accuracy", "acc", "{:.2f}"),
    ("response_length/mean", "len", "{:.0f}"),
    ("loss", "loss", "{:.4f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("clip_frac_high", "clip_hi", "{:.3f}"),
    ("clip_frac_low", "clip_lo", "{:.3f}"),
    ("teacher_log_ratio_mean", "lp-lpT", "{:+.3f}"),
    ("zero_adv_group_frac", "zero_adv", "{:.2f}"),
    ("throughput/tokens_per_s", "tok/s", "{:.0f}"),
)


def to_float(value: Any) -> float | None:
    """A metric value as a Python float (tensors, numpy scalars, bools); None if not a scalar."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Keep the scalar entries of a metrics dict, as floats."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        number = to_float(value)
        if number is not None:
            out[key] = number
    return out


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of <run_dir>/metrics.jsonl (an empty list when absent); a torn last line is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    return rows


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop rows after `last_step` (resume: the steps after the checkpoint will be logged again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [row for row in read_metrics(run_dir) if int(row.get("step", 0)) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


class PhaseTimer:
    """Accumulates wall time per phase of one step: `with timer("generate"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {f"time/{phase}": sec for phase, sec in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        return out


def log_line(step: int, num_steps: int, metrics: dict[str, float]) -> str:
    """`step 3/10 | reward 0.500 | acc 0.50 | ... | 2.1s`: the concise per-step summary."""
    parts = [f"step {step}/{num_steps}"]
    for key, short, fmt in _LOG_LINE_KEYS:
        if key in metrics:
            parts.append(f"{short} {fmt.format(metrics[key])}")
    if "time/step" in metrics:
        parts.append(f"{metrics['time/step']:.1f}s")
    return " | ".join(parts)


class Observer:
    """Rank-0 sink for step metrics, eval results and sampled rollouts of one run."""

    def __init__(
        self,
        run_dir: str | Path,
        logging_cfg,
        num_steps: int,
        start_step: int = 0,
        run_config: dict[str, Any] | None = None,
    ):
        """`run_config`: the (redacted) config recorded with the W&B run."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = logging_cfg
        self.num_steps = num_steps
        truncate_metrics(self.run_dir, start_step)
        # Kept open for the run (one line per step), closed by close().
        self._metrics = open(self.run_dir / METRICS_FILE, "a")  # noqa: SIM115
        self._samples = open(self.run_dir / SAMPLES_FILE, "a")  # noqa: SIM115
        self._tb = self._open_tensorboard() if logging_cfg.tensorboard else None
        self._wandb = self._open_wandb(run_config or {}) if logging_cfg.wandb.project else None
        on_terminal = logging_cfg.progress_bar and sys.stdout.isatty()
        self._progress: Any = None  # a rich Progress bar and its task id, on a terminal only
        self._task: Any = None
        if on_terminal:
            self._progress, self._task = self._open_progress(start_step)

    def _open_tensorboard(self):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _open_wandb(self, run_config: dict[str, Any]):
        """One W&B run per run folder: its id is kept in <run_dir>/wandb_id so a resumed run continues it.
        Neither the command line (it may carry `--set ...api_key=`), the environment, the console nor the
        code is sent: only the scalars and the redacted config."""
        import wandb  # the launch extra

        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        settings = wandb.Settings(
            console="off",
            x_disable_meta=True,
            disable_code=True,
            disable_git=True,
            x_save_requirements=False,
            silent=True,
        )
        wb = self.cfg.wandb
        return wandb.init(
            project=wb.project,
            entity=wb.entity or None,
            mode=wb.mode,
            dir=str(self.run_dir),
            id=run_id,
            name=self.run_dir.name,
            resume="allow",
            config=run_config,
            settings=settings,
        )

    def _open_progress(self, start_step: int):
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[live]}"),
            transient=False,
        )
        progress.start()
        task = progress.add_task("train", total=self.num_steps, completed=start_step, live="")
        return progress, task

    def echo(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, soft_wrap=True, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def _write(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def _plot(self, step: int, values: dict[str, float]) -> None:
        """Finite scalars to tensorboard and W&B (a skipped step's NaN loss stays in metrics.jsonl only)."""
        finite = {key: value for key, value in values.items() if math.isfinite(value)}
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def log_step(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        values = scalars(metrics)
        self._write({"step": step, "kind": "train", **values})
        self._plot(step, values)
        if self._progress is not None:
            live = f"reward {values['reward/mean']:.3f}" if "reward/mean" in values else ""
            self._progress.update(self._task, completed=step, live=live)
        self.echo(log_line(step, self.num_steps, values))
        return values

    def log_eval(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        values = {k if k.startswith("eval/") else f"eval/{k}": v for k, v in scalars(metrics).items()}
        self._write({"step": step, "kind": "eval", **values})
        self._plot(step, values)
        self.echo(f"eval @ step {step}: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in sorted(values.items())))
        return values

    def log_samples(self, step: int, samples: Iterable[Any]) -> None:
        for sample in list(samples)[: self.cfg.rollout_samples]:
            row = {
                "step": step,
                "prompt": sample.record.get("prompt"),
                "answer": sample.record.get("answer"),
                "response": sample.response_text,
                "reward": sample.reward,
                "finish_reason": sample.finish_reason,
            }
            self._samples.write(json.dumps(row, default=str) + "\n")
        self._samples.flush()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._metrics.close()
        self._samples.close()


class NullObserver:
    """What non-zero ranks get: the same methods, doing nothing."""

    def echo(self, text: str) -> None:
        pass

    def log_step(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        return scalars(metrics)

    def log_eval(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        return scalars(metrics)

    def log_samples(self, step: int, samples: Iterable[Any]) -> None:
        pass

    def close(self) -> None:
        pass
