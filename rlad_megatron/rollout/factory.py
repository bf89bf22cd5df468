"""build_engine: one place that turns an EngineConfig section into an Engine.

kind=auto picks an SGLang fleet when CUDA and SGLang are present, the embedded engine otherwise;
kind=http (or any `urls`) talks to running SGLang-compatible servers; kind=embedded runs the torch
engine in-process. The API key comes from `api_key` or the environment variable `api_key_env`.
"""
from __future__ import annotations

import os
from pathlib import Path

ROLES = ("rollout", "teacher")


def resolve_kind(engine_cfg) -> str:
    if engine_cfg.urls and engine_cfg.kind in ("auto", "http"):
        return "http"
    if engine_cfg.kind != "auto":
        return engine_cfg.kind
    try:
        import torch

        if torch.cuda.is_available():
            import importlib.util

            if importlib.util.find_spec("sglang") is not None:
                return "sglang"
    except ImportError:
        pass
    return "embedded"


def resolve_api_key(engine_cfg) -> str:
    return engine_cfg.api_key or os.environ.get(engine_cfg.api_key_env, "")


def _client_kwargs(engine_cfg) -> dict:
    return {"max_concurrency": engine_cfg.max_concurrency, "request_timeout_s": engine_cfg.request_timeout_s,
            "max_retries": engine_cfg.max_retries}


class FleetEngine:
    """An HttpEngine over a fleet this process launched; close() also stops the servers."""

    def __init__(self, fleet):
        self.fleet, self.engine = fleet, fleet.engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def update_weights(self, *, named_tensors=None, path=None, version: int) -> None:
        """From disk through HTTP, or CUDA tensors over NCCL (after fleet.init_weight_sync on trainer rank 0)."""
        if named_tensors is None:
            return self.engine.update_weights(path=path, version=version)
        if getattr(self.fleet, "_group", None) is None:
            raise RuntimeError("NCCL weight sync needs fleet.init_weight_sync(master_address, master_port) first")
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        self.fleet.update_weights_from_distributed(items, version)

    def close(self) -> None:
        self.fleet.stop()


def build_engine(engine_cfg, model_dir: str, role: str = "rollout", log_dir: str = "", gpu_offset: int = 0):
    """An Engine for `role` ('rollout' or 'teacher') serving the HF folder `model_dir`."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; choose one of {list(ROLES)}")
    kind = resolve_kind(engine_cfg)
    if kind != "http" and not (model_dir and (Path(model_dir) / "config.json").is_file()):
        raise FileNotFoundError(f"{role} model folder {model_dir!r} has no config.json (set model.student / model.teacher)")
    if kind == "embedded":
        from rlad_megatron.rollout.embedded import EmbeddedEngine

        return EmbeddedEngine(model_dir, max_batch_size=engine_cfg.max_batch_size)
    if kind == "http":
        from rlad_megatron.rollout.client import HttpEngine

        return HttpEngine(list(engine_cfg.urls), api_key=resolve_api_key(engine_cfg), **_client_kwargs(engine_cfg))
    if kind == "sglang":
        from rlad_megatron.rollout.sglang_fleet import SGLangFleet

        fleet = SGLangFleet(model_dir, engine_cfg.num_servers, engine_cfg.server_args,
                            log_dir or os.path.join("logs", f"{role}_fleet"), host=engine_cfg.host,
                            api_key=resolve_api_key(engine_cfg), gpu_offset=gpu_offset,
                            use_router=engine_cfg.use_router, startup_timeout_s=engine_cfg.startup_timeout_s,
                            **_client_kwargs(engine_cfg))
        return FleetEngine(fleet.start())
    raise ValueError(f"unknown engine kind {kind!r}")
