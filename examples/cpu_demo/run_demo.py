"""The CPU demo: distil a tiny addition TEACHER into a SMALLER student with RLAD, end to end, on CPU.

    python examples/cpu_demo/run_demo.py            # full size (the README's `make demo`)
    python examples/cpu_demo/run_demo.py --smoke    # reduced size, for CI

Stages (each a normal `rlad train` run, through the Megatron trainer and the embedded engines):
  1. tokenizer  a character tokenizer built locally (nothing is downloaded)
  2. teacher    a tiny random model, SFT on the procedural task's solution traces (teacher_sft.yaml)
  3. student    a smaller random model, a short SFT warm start (student_sft.yaml)
  4. eval       teacher and student on held-out prompts (avg@k / pass@k)
  5. RL         RLAD from the student with the teacher (rlad.yaml), then the same recipe with the
                baselines of --compare (default GRPO and on-policy distillation), each evaluated
                during and after training
  6. report     PNG plots + markdown table comparing the runs (`rlad report`), tensorboard logs
The tokenizer, teacher and student are cached under <out>/cache and reused by the next run with
the same settings; the RLAD run starts fresh each time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEACHER_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
STUDENT_ARCH = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# Reduced sizes for CI: same stages, a few steps each.
SMOKE = {
    "teacher": ["train.num_steps=6", "train.prompts_per_step=16"],
    "student": ["train.num_steps=3", "train.prompts_per_step=16"],
    "rlad": [
        "train.num_steps=2",
        "train.prompts_per_step=4",
        "algorithm.group_size=4",
        "eval.interval=2",
        "eval.max_prompts=8",
        "eval.num_samples=2",
        "rollout.max_new_tokens=24",
        "eval.max_new_tokens=24",
    ],
}


def _quiet() -> None:
    # Tiny models: one thread is faster than two (no per-op synchronisation between threads).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def build_tokenizer(cache: Path):
    from rlad_megatron.data.tokenizer import build_char_tokenizer

    folder = cache / "tokenizer"
    if (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return folder, AutoTokenizer.from_pretrained(str(folder)), True
    return folder, build_char_tokenizer(folder), False


def init_model(folder: Path, tokenizer_dir: Path, arch: dict, seed: int) -> Path:
    """A random-init HF llama with the cached tokenizer."""
    from transformers import AutoTokenizer

    from rlad_megatron.tiny_models import save_tiny_model

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    save_tiny_model(
        folder,
        "llama",
        seed=seed,
        tokenizer=False,
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        **arch,
    )
    tok.save_pretrained(str(folder))
    return folder


def sft_model(name: str, cache: Path, tokenizer_dir: Path, arch: dict, seed: int, overrides: list) -> tuple[Path, bool]:
    """Stage 2 / 3: SFT a random model on the task traces; cached by (arch, recipe, overrides)."""
    from rlad_megatron.config import load_config
    from rlad_megatron.conversion.hf_io import resolve_latest
    from rlad_megatron.train import train

    recipe = HERE / f"{name}_sft.yaml"
    key = _key(arch, seed, recipe.read_text(), overrides)
    run_dir = cache / f"{name}_{key}"
    if (run_dir / "hf" / "latest").exists():
        return resolve_latest(run_dir / "hf"), True
    shutil.rmtree(run_dir, ignore_errors=True)
    init = init_model(cache / f"{name}_init_{key}", tokenizer_dir, arch, seed)
    cfg = load_config(recipe, [f"run_dir={run_dir}", f"model.student={init}"] + overrides)
    train(cfg, resume=False)
    return resolve_latest(run_dir / "hf"), False


def evaluate_model(model_dir: Path, cfg) -> dict:
    """avg@k / pass@k of an HF folder on the held-out prompts of the RLAD recipe."""
    from transformers import AutoTokenizer

    from rlad_megatron.components import eval_records
    from rlad_megatron.engines.base import SamplingParams
    from rlad_megatron.engines.embedded import EmbeddedEngine
    from rlad_megatron.eval.evaluate import evaluate
    from rlad_megatron.rewards import build_reward_fn

    e = cfg.eval
    engine = EmbeddedEngine(str(model_dir), max_batch_size=cfg.rollout.max_batch_size)
    sampling = SamplingParams(
        temperature=e.temperature,
        top_p=e.top_p,
        max_new_tokens=e.max_new_tokens,
        seed=(cfg.seed * 7919 + 17) % (2**31 - 1),
    )
    result = evaluate(
        engine,
        AutoTokenizer.from_pretrained(str(model_dir)),
        eval_records(cfg),
        build_reward_fn(cfg.reward, cfg.data),
        k=e.num_samples,
        sampling=sampling,
        max_prompts=e.max_prompts,
    )
    return result["overall"]


def _row(name: str, metrics: dict, k: int) -> str:
    return f"| {name} | {metrics.get(f'avg@{k}', float('nan')):.3f} | {metrics.get(f'pass@{k}', float('nan')):.3f} |"


def rl_run(out: Path, algorithm: str, student: Path, teacher: Path, overrides: list) -> tuple:
    """Stage 5: one RL run from the warm-started student (fresh each time); (run_dir, eval after)."""
    from rlad_megatron.config import load_config
    from rlad_megatron.conversion.hf_io import resolve_latest
    from rlad_megatron.train import train

    run_dir = out / algorithm
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(
        HERE / "rlad.yaml",
        [f"run_dir={run_dir}", f"model.student={student}", f"model.teacher={teacher}", f"algorithm.name={algorithm}"]
        + overrides,
    )
    print(
        f"[5/6] {algorithm}: {cfg.train.num_steps} steps x {cfg.train.prompts_per_step} prompts x "
        f"{cfg.algorithm.group_size} responses",
        flush=True,
    )
    train(cfg, resume=False)
    return run_dir, evaluate_model(resolve_latest(run_dir / "hf"), cfg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="reduced size (CI): a few steps per stage")
    parser.add_argument("--out", default="runs/cpu_demo", help="output folder (cache, runs, report)")
    parser.add_argument(
        "--compare",
        nargs="*",
        default=None,
        metavar="ALGORITHM",
        help="baselines run from the same student for the report (default: grpo opd; none with --smoke)",
    )
    args = parser.parse_args(argv)
    if args.compare is None:
        args.compare = [] if args.smoke else ["grpo", "opd"]
    _quiet()
    from rlad_megatron.config import load_config
    from rlad_megatron.report import write_report

    start = time.time()
    out = Path(args.out) / ("smoke" if args.smoke else "full")
    tok_dir, tok, cached = build_tokenizer(out / "cache")
    print(f"[1/6] tokenizer: {len(tok)} characters in {tok_dir}{' (cached)' if cached else ''}", flush=True)
    smoke = SMOKE if args.smoke else {"teacher": [], "student": [], "rlad": []}
    teacher, cached = sft_model("teacher", out / "cache", tok_dir, TEACHER_ARCH, 11, smoke["teacher"])
    print(f"[2/6] teacher: {teacher}{' (cached)' if cached else ''}", flush=True)
    student, cached = sft_model("student", out / "cache", tok_dir, STUDENT_ARCH, 12, smoke["student"])
    print(f"[3/6] student warm start: {student}{' (cached)' if cached else ''}", flush=True)

    cfg = load_config(HERE / "rlad.yaml", [f"model.student={student}"] + smoke["rlad"])  # eval settings
    k = cfg.eval.num_samples
    teacher_eval, student_eval = evaluate_model(teacher, cfg), evaluate_model(student, cfg)
    print(
        f"[4/6] held-out eval before RL: teacher avg@{k} {teacher_eval[f'avg@{k}']:.3f}, "
        f"student avg@{k} {student_eval[f'avg@{k}']:.3f}",
        flush=True,
    )
    if not args.smoke and teacher_eval[f"avg@{k}"] < student_eval[f"avg@{k}"] + 0.1:
        print(
            "WARNING: the teacher is not clearly better than the student; raise train.num_steps in "
            "teacher_sft.yaml (the cached teacher is keyed by the recipe, so it is retrained)",
            flush=True,
        )
    rows = [_row("teacher (SFT)", teacher_eval, k), _row("student before RL", student_eval, k)]
    run_dirs = []
    for algorithm in ["rlad"] + [a for a in args.compare if a != "rlad"]:
        run_dir, after = rl_run(out, algorithm, student, teacher, smoke["rlad"])
        run_dirs.append(run_dir)
        rows.append(_row(f"student after {algorithm}", after, k))
    written = write_report(run_dirs, out / "report")
    summary = "\n".join(
        [f"| model (held-out addition, {cfg.eval.max_prompts} prompts) | avg@{k} | pass@{k} |", "|---|---|---|"] + rows
    )
    (out / "report" / "summary.md").write_text(summary + "\n")
    print(f"[6/6] done in {time.time() - start:.0f} s\n\n{summary}\n")
    print(f"report:      {written['table']} (plots: {', '.join(str(p) for n, p in written.items() if n != 'table')})")
    print(f"summary:     {out / 'report' / 'summary.md'}")
    print(f"tensorboard: tensorboard --logdir {out} (one folder per run: <run>/tb)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
