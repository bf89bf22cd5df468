"""build_engine: one place that turns an EngineConfig section into an Engine.

kind=auto picks an SGLang fleet when CUDA is present and SGLang's interpreter (`sglang_python`: SGLang
lives in another environment than the trainer in the image, so the trainer's own `find_spec` would never see it) can import
sglang, the embedded engine otherwise; kind=http (or any `urls`) talks to running SGLang-compatible
servers; kind=embedded runs the torch engine in-process. The API key comes from `api_key` or the
environment variable `api_key_env`.

Fleets the trainer launches itself (kind=sglang) share the node with the trainer: `fleet_gpu_offsets`
puts them after the trainer's local ranks (GPUs 0..LOCAL_WORLD_SIZE-1), the teacher first, then the
rollout fleet, and refuses a node with too few GPUs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

ROLES = ("rollout", "teacher")
SGLANG_PYTHON_ENV = "RLAD_SGLANG_PYTHON"


def sglang_python(engine_cfg) -> str:
    """The interpreter with SGLang: `<section>.sglang_python`, else env RLAD_SGLANG_PYTHON, else `python`."""
    return engine_cfg.sglang_python or os.environ.get(SGLANG_PYTHON_ENV, "") or "python"


def sglang_missing(engine_cfg) -> str:
    """'' when SGLang's interpreter can import sglang, else why not (checked in a subprocess, cached)."""
    from rlad_megatron.engines.fleet import import_error

    return import_error(sglang_python(engine_cfg), "sglang")


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_kind(engine_cfg) -> str:
    if engine_cfg.urls and engine_cfg.kind in ("auto", "http"):
        return "http"
    if engine_cfg.kind != "auto":
        return engine_cfg.kind
    if not _cuda():
        return "embedded"
    missing = sglang_missing(engine_cfg)
    if not missing:
        return "sglang"
    warnings.warn(
        f"{engine_cfg._SECTION}.kind=auto: CUDA is present but `{sglang_python(engine_cfg)}` cannot import "
        f"sglang ({missing}); using the embedded engine. {_python_hint(engine_cfg)}",
        stacklevel=2,
    )
    return "embedded"


def _python_hint(engine_cfg) -> str:
    return (
        f"Set {engine_cfg._SECTION}.sglang_python or {SGLANG_PYTHON_ENV} to the python of SGLang's environment "
        "(in the image: /opt/sglang/bin/python)."
    )


def check_sglang(engine_cfg) -> None:
    """kind=sglang: fail now, naming the setting, when SGLang's interpreter is missing or lacks sglang."""
    missing = sglang_missing(engine_cfg)
    if missing:
        raise RuntimeError(
            f"{engine_cfg._SECTION}.kind=sglang, but `{sglang_python(engine_cfg)} -c 'import sglang'` "
            f"failed ({missing}). {_python_hint(engine_cfg)}"
        )


def fleet_gpus(engine_cfg) -> int:
    """GPUs a fleet launched by this process takes (0 unless it resolves to kind=sglang)."""
    if resolve_kind(engine_cfg) != "sglang":
        return 0
    from rlad_megatron.engines.sglang_fleet import tp_size

    return engine_cfg.num_servers * tp_size(engine_cfg.server_args)


def fleet_gpu_offsets(
    engines: Mapping[str, object], trainer_gpus: int | None = None, device_count: int | None = None
) -> dict[str, int]:
    """{role: first GPU} for the fleets this trainer process launches (`engines`: role -> EngineConfig; the
    roles are 'rollout' and the teachers' config sections, 'teacher' or 'teachers.<name>').

    The trainer's local ranks hold GPUs 0..W-1 (W = LOCAL_WORLD_SIZE, torchrun's; 1 without it), so the
    fleets start after them: the teachers first (in config order), then the rollout fleet. Fleets not launched
    here (http, embedded) take no GPU. Too few GPUs on the node is an error naming the sizes."""
    order = [role for role in engines if role != "rollout"] + [role for role in engines if role == "rollout"]
    sizes = {role: fleet_gpus(engines[role]) for role in order}
    if not any(sizes.values()):
        return {role: 0 for role in engines}
    first = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if trainer_gpus is None else trainer_gpus
    offsets, next_gpu = {}, first
    for role, size in sizes.items():
        offsets[role], next_gpu = next_gpu, next_gpu + size
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count()
    if next_gpu > device_count:
        used = " + ".join(f"{role} {size}" for role, size in sizes.items() if size)
        raise ValueError(
            f"this node has {device_count} GPU(s) (torch.cuda.device_count()) but the trainer's {first} "
            f"local rank(s) (LOCAL_WORLD_SIZE) + the fleets it launches ({used}: num_servers x "
            "server_args.tp_size) need " + str(next_gpu) + "; lower the fleets' num_servers / tp_size, "
            "run fewer trainer ranks, or launch the fleets with the node agent (rlad render)"
        )
    return offsets


def resolve_api_key(engine_cfg) -> str:
    return engine_cfg.api_key or os.environ.get(engine_cfg.api_key_env, "")


def context_length(engine_cfg, model_dir: str) -> int | None:
    """The servers' context length as SGLang sets it: `server_args.context_length`, else the model's
    max_position_embeddings (None when the model folder is not readable here)."""
    if engine_cfg.server_args.get("context_length"):
        return int(engine_cfg.server_args["context_length"])
    config = Path(model_dir) / "config.json" if model_dir else None
    if config is None or not config.is_file():
        return None
    from rlad_megatron.engines.model import read_config

    value = read_config(model_dir).get("max_position_embeddings")
    return int(value) if value else None


def routes_shape(model_dir: str) -> tuple[int, int]:
    """(MoE layers, experts per token) of the served model, to shape the routed experts servers return."""
    from rlad_megatron.engines.model import read_config

    config = read_config(model_dir)
    if not config.get("num_experts_per_tok"):
        raise ValueError(f"model.routing_replay needs an MoE model; {model_dir} has no num_experts_per_tok")
    return int(config["num_hidden_layers"]), int(config["num_experts_per_tok"])


def _client_kwargs(engine_cfg) -> dict:
    return {
        "max_concurrency": engine_cfg.max_concurrency,
        "request_timeout_s": engine_cfg.request_timeout_s,
        "max_retries": engine_cfg.max_retries,
        "health_timeout_s": engine_cfg.health_timeout_s,
    }


class FleetEngine:
    """An HttpEngine over a fleet this process launched; close() also stops the servers. Weights reach the
    servers like any others' (rollout.sync: distributed over NCCL, or disk)."""

    def __init__(self, fleet):
        self.fleet, self.engine = fleet, fleet.engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def close(self) -> None:
        self.fleet.stop()


def build_engine(
    engine_cfg,
    model_dir: str,
    role: str = "rollout",
    log_dir: str = "",
    gpu_offset: int = 0,
    record_routes: bool = False,
):
    """An Engine for `role` ('rollout' or 'teacher') serving the HF folder `model_dir`.

    `record_routes` (MoE routing replay): launched SGLang servers get --enable-return-routed-experts, and HTTP
    clients learn the model's (layers, k) to shape the routes the servers return."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; choose one of {list(ROLES)}")
    kind = resolve_kind(engine_cfg)
    if kind != "http" and not (model_dir and (Path(model_dir) / "config.json").is_file()):
        raise FileNotFoundError(
            f"{role} model folder {model_dir!r} has no config.json (set model.student / model.teacher)"
        )
    if kind == "embedded":
        from rlad_megatron.engines.embedded import EmbeddedEngine

        return EmbeddedEngine(
            model_dir, max_batch_size=engine_cfg.max_batch_size, context_length=context_length(engine_cfg, model_dir)
        )
    if kind == "http":
        from rlad_megatron.engines.client import HttpEngine

        return HttpEngine(
            list(engine_cfg.urls),
            api_key=resolve_api_key(engine_cfg),
            context_length=context_length(engine_cfg, model_dir),
            routes_shape=routes_shape(model_dir) if record_routes else None,
            **_client_kwargs(engine_cfg),
        )
    if kind == "sglang":
        from rlad_megatron.engines.sglang_fleet import SGLangFleet

        check_sglang(engine_cfg)
        server_args = dict(engine_cfg.server_args)
        if record_routes:
            server_args["enable_return_routed_experts"] = True
        fleet = SGLangFleet(
            model_dir,
            engine_cfg.num_servers,
            server_args,
            log_dir or os.path.join("logs", f"{role}_fleet"),
            host=engine_cfg.host,
            api_key=resolve_api_key(engine_cfg),
            gpu_offset=gpu_offset,
            use_router=engine_cfg.use_router,
            startup_timeout_s=engine_cfg.startup_timeout_s,
            python=sglang_python(engine_cfg),
            context_length=context_length(engine_cfg, model_dir),
            routes_shape=routes_shape(model_dir) if record_routes else None,
            **_client_kwargs(engine_cfg),
        )
        return FleetEngine(fleet.start())
    raise ValueError(f"unknown engine kind {kind!r}")
