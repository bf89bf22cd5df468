"""SGLang fleets on GPU nodes: launch N servers, put sglang-router in front, sync weights over NCCL.

Launch: `<sglang python> -m sglang.launch_server --model-path M --host H --port P --base-gpu-id G
[--api-key K] <server_args>` per server, with EngineConfig.server_args passed through
(`{"tp_size": 8, "mem_fraction_static": 0.8}` -> `--tp-size 8 --mem-fraction-static 0.8`; True -> a
bare flag; a legacy `tp` key means `tp_size`). The interpreter is EngineConfig.sglang_python (the
image keeps SGLang in the base Python, the trainer in its own venv). Server i gets GPUs
[gpu_offset + i * tp, gpu_offset + (i + 1) * tp). The fleet waits for /health_generate on every
server, then starts `sglang_router.launch_router --worker-urls ...` from the same interpreter (when
it has no router, the client balances over the servers itself).

Weight sync is the trainer's (engines/weight_sync.py): the fleet's engine lists the servers
(not the router: sglang-router does not forward the weight-update calls) and the trainer's stage
senders broadcast into them over NCCL.

SGLang cannot serve on CPU, so nothing here runs in CPU CI beyond command construction; the
NCCL path is exercised only by the gpu-marked test.
"""

from __future__ import annotations

import sys
from typing import Any

from rlad_megatron.engines.client import HttpEngine
from rlad_megatron.engines.fleet import (
    ServerProcess,
    free_port,
    launch_fleet,
    launch_router,
)


def server_args_to_cli(server_args: dict[str, Any]) -> list[str]:
    """{"tp_size": 8, "enable_x": True, "mem_fraction_static": 0.8} -> ["--tp-size", "8", "--enable-x", ...]."""
    out: list[str] = []
    for key, value in server_args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


TP_ALIASES = ("tp", "tensor_parallel_size")  # SGLang's flag is --tp-size; `--tp` only worked as an argparse prefix


def normalize_server_args(server_args: dict[str, Any]) -> dict[str, Any]:
    """server_args with a legacy `tp` (or `tensor_parallel_size`) key renamed to SGLang's `tp_size`."""
    out = dict(server_args)
    given = [k for k in ("tp_size", *TP_ALIASES) if k in out]
    if len(given) > 1:
        raise ValueError(f"server_args sets the tensor-parallel size twice ({given}); keep only tp_size")
    if given and given[0] != "tp_size":
        out["tp_size"] = out.pop(given[0])
    return out


def tp_size(server_args: dict[str, Any]) -> int:
    """GPUs of one server: server_args' tp_size (or a legacy alias), 1 when unset."""
    return int(normalize_server_args(server_args).get("tp_size", 1))


def sglang_server_cmd(
    model_dir: str,
    port: int,
    host: str,
    server_args: dict[str, Any],
    base_gpu_id: int,
    api_key: str = "",
    python: str = sys.executable,
) -> list[str]:
    reserved = {"model_path", "host", "port", "api_key", "base_gpu_id"}
    clash = sorted(reserved & set(server_args))
    if clash:
        raise ValueError(f"server_args {clash} are set by the fleet; remove them from the config")
    server_args = normalize_server_args(server_args)
    cmd = [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--base-gpu-id",
        str(base_gpu_id),
    ]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + server_args_to_cli(server_args)


class SGLangFleet:
    """N SGLang servers (+ router) for one role (rollout or teacher); `engine` talks to them."""

    def __init__(
        self,
        model_dir: str,
        num_servers: int,
        server_args: dict[str, Any],
        log_dir: str,
        host: str = "127.0.0.1",
        api_key: str = "",
        gpu_offset: int = 0,
        use_router: bool = True,
        startup_timeout_s: float = 900.0,
        python: str = sys.executable,
        **client_kwargs,
    ):
        self.model_dir, self.num_servers = model_dir, num_servers
        self.server_args = normalize_server_args(server_args)
        self.log_dir, self.host, self.api_key = log_dir, host, api_key
        self.gpu_offset, self.use_router, self.startup_timeout_s = gpu_offset, use_router, startup_timeout_s
        self.python = python  # SGLang's interpreter, for the servers and the router
        self.client_kwargs = client_kwargs
        self.tp = tp_size(self.server_args)
        self.servers: list[ServerProcess] = []
        self.router: ServerProcess | None = None
        self.engine: HttpEngine | None = None
        self.worker_urls: list[str] = []

    def start(self) -> SGLangFleet:
        ports = [free_port() for _ in range(self.num_servers)]
        self.worker_urls = [f"http://{self.host}:{p}" for p in ports]
        cmds = [
            sglang_server_cmd(
                self.model_dir, p, self.host, self.server_args, self.gpu_offset + i * self.tp, self.api_key, self.python
            )
            for i, p in enumerate(ports)
        ]
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        self.servers = launch_fleet(cmds, self.worker_urls, self.log_dir, self.startup_timeout_s, headers=headers)
        urls = self.worker_urls
        if self.use_router and not self.api_key:  # the router would need the key too; balance client-side then
            self.router = launch_router(self.worker_urls, free_port(), self.log_dir, host=self.host, python=self.python)
            if self.router is not None:
                urls = [self.router.url]
        self.engine = HttpEngine(urls, api_key=self.api_key, **self.client_kwargs)
        # generation goes through the router; the weight sync must reach every server itself
        self.engine.sync_urls = list(self.worker_urls)
        return self

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()
        for p in ([self.router] if self.router else []) + self.servers:
            p.stop()
