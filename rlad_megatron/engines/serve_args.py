"""`rlad serve`'s command line: its own flags plus the SGLang launch flags the node agent passes.

With `launch.server_impl=rlad` the node agent starts `rlad serve` with the very flags it gives
`sglang.launch_server`, so one placement runs either server. Each SGLang flag is one of:

* honoured: --model-path, --host, --port, --api-key, --dtype (auto = float32 on CPU),
  --context-length, --allow-auto-truncate, --skip-tokenizer-init, --enable-deterministic-inference (rlad serve always is:
  a sample depends only on its seed), --tp-size 1, --nnodes 1;
* accepted without effect: --base-gpu-id and --mem-fraction-static (GPU placement and memory),
  --trust-remote-code (only config.json and safetensors are read, no model code runs),
  --node-rank / --dist-init-addr (meaningful only with --nnodes > 1);
* refused by name: --tp-size > 1 and --nnodes > 1 (one CPU process), and every other SGLang flag
  (argparse's "unrecognized arguments" plus a hint: a flag that changes serving must not be dropped
  silently). Abbreviations are off, so an SGLang flag is never read as a prefix of one of these.
"""

from __future__ import annotations

import argparse

# SGLang's --dtype choices -> the torch dtype the CPU engine loads ("auto": float32, the CPU default).
DTYPES = {
    "auto": "float32",
    "float": "float32",
    "float32": "float32",
    "half": "float16",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
UNRECOGNIZED_HINT = (
    "; rlad serve (the CPU stand-in for SGLang) honours only the SGLang flags listed in "
    "docs/launch.md: drop the flag from engines/teacher.server_args, or run the fleet on SGLang "
    "(launch.server_impl=sglang)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.allow_abbrev = False  # `--mem-fraction` must not silently become another flag
    parser.add_argument(
        "--model", "--model-path", dest="model", required=True, help="Hugging Face folder (config.json + safetensors)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env RLAD_API_KEY)"
    )
    parser.add_argument(
        "--weights-root", default="", help="folder under which /update_weights_from_disk paths must lie"
    )
    parser.add_argument("--max-batch-size", type=int, default=64, help="sequences decoded together")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES), help="weights dtype (auto: float32)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    sglang = parser.add_argument_group("SGLang launch flags (so the node agent can start either server)")
    sglang.add_argument(
        "--tp-size",
        "--tensor-parallel-size",
        dest="tp_size",
        type=int,
        default=1,
        help="tensor-parallel size: only 1 (one CPU process)",
    )
    sglang.add_argument("--nnodes", type=int, default=1, help="nodes of one server: only 1")
    sglang.add_argument("--node-rank", type=int, default=0, help="accepted; no effect with --nnodes 1")
    sglang.add_argument("--dist-init-addr", default="", help="accepted; no effect with --nnodes 1")
    sglang.add_argument("--base-gpu-id", type=int, default=0, help="accepted; no effect on CPU")
    sglang.add_argument("--mem-fraction-static", type=float, default=None, help="accepted; no effect on CPU")
    sglang.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="longest prompt + response accepted (default and maximum: the model's)",
    )
    sglang.add_argument(
        "--allow-auto-truncate",
        action="store_true",
        help="cut over-long prompts and max_new_tokens to the context instead of refusing them (SGLang's rules)",
    )
    sglang.add_argument("--skip-tokenizer-init", action="store_true", help="no tokenizer: responses carry no text")
    sglang.add_argument(
        "--enable-deterministic-inference",
        action="store_true",
        help="accepted; rlad serve is always deterministic per sample seed",
    )
    sglang.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted; no model code is ever loaded (config.json + safetensors only)",
    )
    parser.set_defaults(unrecognized_hint=UNRECOGNIZED_HINT)


def check(args: argparse.Namespace) -> None:
    """Refuse the SGLang settings one CPU process cannot honour, naming the flag."""
    if args.tp_size != 1:
        raise ValueError(
            f"--tp-size {args.tp_size}: rlad serve runs one CPU process (tensor-parallel size 1); "
            "use SGLang (launch.server_impl=sglang) or tp 1 (launch.rollout_tp / launch.teacher_tp=1)"
        )
    if args.nnodes != 1:
        raise ValueError(
            f"--nnodes {args.nnodes}: rlad serve runs on one node; a server spanning nodes needs SGLang "
            "(launch.server_impl=sglang)"
        )
    if args.context_length is not None and args.context_length < 1:
        raise ValueError(f"--context-length {args.context_length}: must be >= 1")


def torch_dtype(args: argparse.Namespace) -> str:
    return DTYPES[args.dtype]


def context_length(args: argparse.Namespace, model_max: int) -> int:
    """--context-length, which may shorten but not lengthen the model's own (as SGLang refuses by default)."""
    if args.context_length is None:
        return model_max
    if args.context_length > model_max:
        raise ValueError(
            f"--context-length {args.context_length} is longer than the model's max_position_embeddings ({model_max})"
        )
    return args.context_length
