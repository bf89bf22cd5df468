"""`rlad eval`: avg@k / pass@k of a checkpoint on a dataset or task, written as JSON + markdown.

    rlad eval --model runs/x/hf --data task:addition --k 8 --temperature 0.6 --out runs/x/eval
    rlad eval --config recipes/kk.yaml --model ckpt_hf --set data.task_kwargs.size=200

Models: a Hugging Face folder (config.json + weights + tokenizer files), or a Megatron `torch_dist`
checkpoint folder (metadata.json), which is first exported to `<out>/hf_model` with
`rlad_megatron.conversion.convert.megatron_to_hf` (its HF config and tokenizer travel in
`<ckpt>/hf_config`, or pass `--hf-config`). Generation goes through the
same Engine interface as training (`rlad_megatron.engines.build_engine` with the run's `rollout`
engine settings); sampling comes from the `eval` section or the flags below.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model folder, or a Megatron torch_dist checkpoint")
    parser.add_argument(
        "--hf-config",
        default="",
        help="HF config + tokenizer folder for a Megatron checkpoint (default: <ckpt>/hf_config)",
    )
    parser.add_argument(
        "--data",
        default="",
        help="prompt source (file, datasets folder, task:<name>, "
        "reasoning_gym:<task>); default: the recipe's data.eval, else data.train",
    )
    parser.add_argument("--config", default=None, help="YAML recipe supplying data / reward / eval / rollout sections")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, repeatable (e.g. data.task_kwargs.size=100)",
    )
    parser.add_argument("--split", default="test", choices=("train", "test"), help="task split (default: held-out)")
    parser.add_argument("--reward", default="", help="reward name (default: reward.name, auto from the data source)")
    parser.add_argument("--k", type=int, default=None, help="samples per prompt (eval.num_samples)")
    parser.add_argument("--temperature", type=float, default=None, help="eval.temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, help="eval.top_p")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="eval.max_new_tokens")
    parser.add_argument("--max-prompts", type=int, default=None, help="eval.max_prompts (0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="run seed (data generation and sampling)")
    parser.add_argument("--out", default="", help="output folder (default: <run_dir>/eval)")
    parser.add_argument("--name", default="eval", help="report file stem: <out>/<name>.json and .md")


def _flag_overrides(args: argparse.Namespace) -> list:
    pairs = {
        "eval.num_samples": args.k,
        "eval.temperature": args.temperature,
        "eval.top_p": args.top_p,
        "eval.max_new_tokens": args.max_new_tokens,
        "eval.max_prompts": args.max_prompts,
        "seed": args.seed,
    }
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def resolve_model_dir(path: str, out_dir: Path, hf_config: str = "") -> Path:
    """An HF folder to serve: `path` itself, or its export when `path` is a Megatron dist checkpoint."""
    model = Path(path)
    if (model / "config.json").exists():
        return model
    if (model / "metadata.json").exists():
        from rlad_megatron.conversion.convert import megatron_to_hf

        exported = out_dir / "hf_model"
        print(f"exporting Megatron checkpoint {model} to {exported}")
        return megatron_to_hf(model, exported, hf_config_dir=hf_config or None)
    raise SystemExit(
        f"rlad eval: --model {path!r} is neither a Hugging Face folder (config.json) nor a Megatron "
        "torch_dist checkpoint (metadata.json)"
    )


def run(args: argparse.Namespace) -> int:
    from rlad_megatron.data import DatasetError

    try:
        return _run(args)
    except (DatasetError, FileNotFoundError) as err:  # bad input: the message names the problem and the fix
        print(f"rlad eval: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from rlad_megatron.config import load_config

    cfg = load_config(args.config, list(args.overrides) + _flag_overrides(args))
    source = args.data or cfg.data.eval or cfg.data.train
    if not source:
        print("rlad eval: no prompts; pass --data or set data.eval in the recipe", file=sys.stderr)
        return 2
    out_dir = Path(args.out or Path(cfg.run_dir) / "eval")
    model_dir = resolve_model_dir(args.model, out_dir, args.hf_config)
    result = evaluate_checkpoint(cfg, model_dir, source, split=args.split, reward_name=args.reward or cfg.reward.name)
    from rlad_megatron.eval.evaluate import markdown_table, write_report

    paths = write_report(result, out_dir, args.name)
    print(markdown_table(result))
    print(f"wrote {paths['json']} and {paths['markdown']}")
    return 0


def evaluate_checkpoint(cfg: Any, model_dir: Path, source: str, *, split: str, reward_name: str) -> dict:
    """Load prompts + tokenizer, build the engine, run `evaluate`, close the engine."""
    from transformers import AutoTokenizer

    from rlad_megatron.data import load_prompts
    from rlad_megatron.engines import SamplingParams, build_engine
    from rlad_megatron.eval.evaluate import evaluate
    from rlad_megatron.rewards import get_reward_fn, resolve_reward_name

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = load_prompts(source, cfg.data, tokenizer, split=split, seed=cfg.seed)
    name = resolve_reward_name(reward_name, source)
    kwargs = dict(cfg.reward.kwargs)
    if name == "math":
        kwargs.update(timeout_s=cfg.reward.timeout_s, num_workers=cfg.reward.num_workers)
    reward_fn = get_reward_fn(name, **kwargs)
    sampling = SamplingParams(
        temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed
    )
    engine = build_engine(cfg.rollout, str(model_dir), "rollout")
    try:
        result = evaluate(
            engine,
            tokenizer,
            prompts.records,
            reward_fn,
            k=cfg.eval.num_samples,
            sampling=sampling,
            batch_size=cfg.eval.batch_size,
            breakdown_keys=cfg.eval.breakdown_keys,
            max_prompts=cfg.eval.max_prompts,
            keep_samples=8,
        )
    finally:
        getattr(engine, "close", lambda: None)()
    result.update(model=str(model_dir), data=source, split=split, reward=name, num_skipped_rows=prompts.num_skipped)
    return result
