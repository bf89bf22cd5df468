"""`rlad convert`: Hugging Face folder <-> Megatron dist checkpoint, streaming (no Megatron import).

    rlad convert hf-to-megatron --hf MODEL_DIR --out CKPT_DIR [--dtype bf16]
    rlad convert megatron-to-hf --ckpt CKPT_DIR --out HF_DIR [--hf-config MODEL_DIR] [--dtype bf16]
                                [--max-shard-size 2GB] [--key-prefix PREFIX]

`megatron-to-hf` reads any `torch_dist` checkpoint of the model: one written by `hf-to-megatron`
(it carries its HF config in `CKPT_DIR/hf_config`) or a trainer checkpoint `run/checkpoints/step_N`
saved at any TP/PP (then pass `--hf-config` = the student's HF folder for config and tokenizer).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from rlad_megatron.conversion.arch import parse_dtype

_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text: str) -> int:
    """'2GB' / '500MiB' / '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 2GB, 500MiB or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subs = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_mc = subs.add_parser("hf-to-megatron", help="HF safetensors folder -> Megatron torch_dist checkpoint")
    to_mc.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    to_mc.add_argument("--out", required=True, help="output checkpoint folder (loadable at any TP/PP)")
    to_mc.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the config's dtype)")
    to_hf = subs.add_parser("megatron-to-hf", help="Megatron torch_dist checkpoint -> sharded HF safetensors")
    to_hf.add_argument("--ckpt", required=True, help="checkpoint folder (holds metadata.json)")
    to_hf.add_argument("--out", required=True, help="output HF folder")
    to_hf.add_argument(
        "--hf-config", default=None, help="HF folder with config.json + tokenizer (default: CKPT/hf_config)"
    )
    to_hf.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: the checkpoint's dtype)")
    to_hf.add_argument(
        "--max-shard-size", type=parse_size, default=parse_size("2GB"), help="largest safetensors shard (default 2GB)"
    )
    to_hf.add_argument(
        "--key-prefix", default=None, help="prefix of the model keys in the checkpoint (default: detected)"
    )


def run(args: argparse.Namespace) -> int:
    from rlad_megatron.conversion import convert

    start = time.perf_counter()
    try:
        dtype = parse_dtype(args.dtype)
        if args.direction == "hf-to-megatron":
            out = convert.hf_to_megatron(args.hf, args.out, dtype=dtype)
        else:
            out = convert.megatron_to_hf(
                args.ckpt,
                args.out,
                hf_config_dir=args.hf_config,
                dtype=dtype,
                max_shard_bytes=args.max_shard_size,
                key_prefix=args.key_prefix,
            )
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"rlad convert: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))
