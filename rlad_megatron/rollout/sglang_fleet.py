"""SGLang fleets on GPU nodes: launch N servers, put sglang-router in front, sync weights over NCCL.

Launch: `python -m sglang.launch_server --model-path M --host H --port P --base-gpu-id G
[--api-key K] <server_args>` per server, with EngineConfig.server_args passed through
(`{"tp": 8, "mem_fraction_static": 0.8}` -> `--tp 8 --mem-fraction-static 0.8`; True -> a bare
flag). Server i gets GPUs [i * tp, (i + 1) * tp). The fleet waits for /health_generate on
every server, then starts `sglang_router.launch_router --worker-urls ...` (when the router is
not installed, the client balances over the servers itself).

NCCL weight sync follows SGLang's API: POST /init_weights_update_group once
({master_address, master_port, rank_offset, world_size, group_name, backend}; the trainer is
rank 0 and server i's TP ranks start at 1 + i * tp), then per update POST
/update_weights_from_distributed ({names, dtypes, shapes, group_name, flush_cache,
weight_version}) on every server while rank 0 broadcasts each tensor in the same order.

SGLang cannot serve on CPU, so nothing here runs in CPU CI beyond command construction; the
NCCL path is exercised only by the gpu-marked test.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from typing import Any

import httpx

from rlad_megatron.rollout.client import HttpEngine
from rlad_megatron.rollout.fleet import (
    ServerProcess,
    free_port,
    launch_fleet,
    launch_router,
)


def server_args_to_cli(server_args: dict[str, Any]) -> list[str]:
    """{"tp": 8, "enable_x": True, "mem_fraction_static": 0.8} -> ["--tp", "8", "--enable-x", ...]."""
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


def sglang_server_cmd(model_dir: str, port: int, host: str, server_args: dict[str, Any], base_gpu_id: int,
                      api_key: str = "") -> list[str]:
    reserved = {"model_path", "host", "port", "api_key", "base_gpu_id"}
    clash = sorted(reserved & set(server_args))
    if clash:
        raise ValueError(f"server_args {clash} are set by the fleet; remove them from the config")
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", host,
           "--port", str(port), "--base-gpu-id", str(base_gpu_id)]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd + server_args_to_cli(server_args)


class SGLangFleet:
    """N SGLang servers (+ router) for one role (rollout or teacher); `engine` talks to them."""

    def __init__(self, model_dir: str, num_servers: int, server_args: dict[str, Any], log_dir: str,
                 host: str = "127.0.0.1", api_key: str = "", gpu_offset: int = 0, use_router: bool = True,
                 startup_timeout_s: float = 900.0, **client_kwargs):
        self.model_dir, self.num_servers, self.server_args = model_dir, num_servers, dict(server_args)
        self.log_dir, self.host, self.api_key = log_dir, host, api_key
        self.gpu_offset, self.use_router, self.startup_timeout_s = gpu_offset, use_router, startup_timeout_s
        self.client_kwargs = client_kwargs
        self.tp = int(self.server_args.get("tp", self.server_args.get("tp_size", 1)))
        self.servers: list[ServerProcess] = []
        self.router: ServerProcess | None = None
        self.engine: HttpEngine | None = None
        self.worker_urls: list[str] = []
        self._group = None
        self._group_name = ""

    def start(self) -> SGLangFleet:
        ports = [free_port() for _ in range(self.num_servers)]
        self.worker_urls = [f"http://{self.host}:{p}" for p in ports]
        cmds = [sglang_server_cmd(self.model_dir, p, self.host, self.server_args, self.gpu_offset + i * self.tp,
                                  self.api_key) for i, p in enumerate(ports)]
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        self.servers = launch_fleet(cmds, self.worker_urls, self.log_dir, self.startup_timeout_s, headers=headers)
        urls = self.worker_urls
        if self.use_router and not self.api_key:  # the router would need the key too; balance client-side then
            self.router = launch_router(self.worker_urls, free_port(), self.log_dir, host=self.host)
            if self.router is not None:
                urls = [self.router.url]
        self.engine = HttpEngine(urls, api_key=self.api_key, **self.client_kwargs)
        return self

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.close()
        for p in ([self.router] if self.router else []) + self.servers:
            p.stop()

    # ------------------------------------------------------------------ NCCL weight sync
    def init_weight_sync(self, master_address: str, master_port: int, group_name: str = "rlad_weight_sync"):
        """Create the NCCL group {trainer rank 0} + every server's TP ranks; returns the trainer's group."""
        world_size = 1 + self.num_servers * self.tp
        results: list[Any] = [None] * self.num_servers

        def call(i: int, url: str) -> None:
            payload = {"master_address": master_address, "master_port": master_port, "rank_offset": 1 + i * self.tp,
                       "world_size": world_size, "group_name": group_name, "backend": "nccl"}
            results[i] = self._post(url, "/init_weights_update_group", payload, timeout=600)

        threads = [threading.Thread(target=call, args=(i, u)) for i, u in enumerate(self.worker_urls)]
        for t in threads:
            t.start()
        group = init_custom_process_group(master_address, master_port, world_size, 0, group_name)
        for t in threads:
            t.join()
        _check_all(results, "init_weights_update_group")
        self._group, self._group_name = group, group_name
        return group

    def update_weights_from_distributed(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        """Broadcast HF-named CUDA tensors from trainer rank 0 into every server, in one SGLang call."""
        import torch.distributed as dist

        items = list(named_tensors)
        payload = {"names": [n for n, _ in items], "dtypes": [str(t.dtype).replace("torch.", "") for _, t in items],
                   "shapes": [list(t.shape) for _, t in items], "group_name": self._group_name,
                   "flush_cache": True, "weight_version": str(version)}
        results: list[Any] = [None] * self.num_servers

        def call(i: int, url: str) -> None:
            results[i] = self._post(url, "/update_weights_from_distributed", payload, timeout=1800)

        threads = [threading.Thread(target=call, args=(i, u)) for i, u in enumerate(self.worker_urls)]
        for t in threads:
            t.start()
        for _, tensor in items:  # same order as `names`: SGLang receives them one by one
            dist.broadcast(tensor, src=0, group=self._group)
        for t in threads:
            t.join()
        _check_all(results, "update_weights_from_distributed")
        if self.engine is not None:
            self.engine.version = int(version)

    def _post(self, url: str, path: str, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.post(url + path, json=payload, headers=headers, timeout=timeout)
            return {"status": r.status_code, **(r.json() if r.content else {})}
        except (httpx.HTTPError, ValueError) as err:
            return {"status": 0, "success": False, "message": f"{type(err).__name__}: {err}"}


def _check_all(results: list[dict[str, Any]], what: str) -> None:
    bad = [f"server {i}: {r}" for i, r in enumerate(results) if not r or r.get("status") != 200 or not r.get("success", True)]
    if bad:
        raise RuntimeError(f"{what} failed on {len(bad)} server(s): " + "; ".join(bad))


def init_custom_process_group(master_address: str, master_port: int, world_size: int, rank: int, group_name: str,
                              backend: str = "nccl"):
    """A process group outside the trainer's default world (trainer rank 0 + SGLang ranks), as SGLang builds
    its side; uses torch's c10d helpers the same way (GPU only, not exercised on CPU)."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timedelta(minutes=10)))
    store.set_timeout(timedelta(minutes=10))
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend),
                                           c10d.PrefixStore(group_name, store), group_name=group_name,
                                           timeout=timedelta(minutes=10))
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg
