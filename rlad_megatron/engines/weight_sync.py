"""Weight sync over the wire: trainer ranks broadcast HF-named tensors into running inference servers.

The protocol is SGLang's own (0.5.23, `srt/entrypoints/http_server.py` and `managers/io_struct.py`),
spoken identically to SGLang servers (NCCL, GPU) and to `rlad serve` (gloo, CPU):

    POST /init_weights_update_group   {master_address, master_port, rank_offset, world_size, group_name, backend}
    POST /begin_weight_update         {}                    once per sync, by trainer rank 0
    POST /update_weights_from_distributed {names, dtypes, shapes, group_name, flush_cache, weight_version}
         ... while the group's rank 0 broadcasts each named tensor, in `names` order
    POST /end_weight_update           {}                    once per sync, by trainer rank 0
    POST /destroy_weights_update_group {group_name}         when the membership changes

Pipeline parallelism: every pipeline stage owns its layers, so each stage's sender (its DP=0 / TP=0
rank, which already receives the TP-gathered tensors) forms its own named group with every server
and broadcasts only that stage's buckets; no stage ships another stage's weights and nothing goes
through disk. A server with TP=t joins a group as t ranks (`rank_offset` counts them), as SGLang does.

Membership: before each sync, trainer rank 0 probes every server's /health; if the set of answering
servers changed (a server died, or a restarted one came back), every stage rebuilds its group over
the new set, so a restarted server receives the full current weights at the next sync.

This module has no Megatron import: the trainer side of the loop (components.py) feeds it buckets.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import httpx


class WeightSyncError(RuntimeError):
    """A server refused or failed a step of the weight-sync protocol."""


def group_name(stage: int, generation: int) -> str:
    """One name per pipeline stage and membership change; a restarted trainer reuses the names, and a server
    joining a name again replaces its old group (SGLang does the same)."""
    return f"rlad_weights_pp{stage}_g{generation}"


def default_sync_host() -> str:
    """An address of this host that the servers can reach: its fully qualified name."""
    return socket.getfqdn()


def free_port_on(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError:  # a name that resolves elsewhere (e.g. fqdn -> 127.0.1.1): any local port works
            s.bind(("", 0))
        return s.getsockname()[1]


def init_custom_process_group(
    master_address: str, master_port: int, world_size: int, rank: int, name: str, backend: str, timeout_s: float
):
    """A process group outside the trainer's default world: {one trainer rank} + the servers' ranks.

    Built the way SGLang builds its side (a TCP store at master_address:master_port hosted by rank 0, a
    PrefixStore named after the group, an identity rank map), so both ends agree; the same code runs on gloo
    (CPU, `rlad serve`) and NCCL (GPU, SGLang). The store is made directly rather than through
    `c10d.rendezvous`: under torchrun that would join torchrun's own agent store instead of hosting one."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        master_address, master_port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False
    )
    pg, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        c10d.PrefixStore(name, store),
        group_name=name,  # type: ignore[arg-type]  # torch 2.13 types it as GroupName, a NewType of str
        timeout=timeout,
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_group(pg) -> None:
    import torch.distributed as dist

    try:
        dist.destroy_process_group(pg)
    except (ValueError, RuntimeError, KeyError):  # already gone with a dead peer: nothing left to free
        pass


def flatten_bucket(tensors: Sequence[Any]):
    """The bytes of every tensor, in order, in one uint8 tensor (SGLang's FlattenedTensorBucket layout)."""
    import torch

    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unflatten_bucket(flat, dtypes: Sequence[Any], shapes: Sequence[Sequence[int]]) -> list[Any]:
    """The inverse of `flatten_bucket`: tensors of `dtypes` / `shapes` viewed out of the byte tensor, copied."""
    import math

    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes):
        nbytes = math.prod(shape) * dtype.itemsize
        out.append(flat[offset : offset + nbytes].view(dtype).view(list(shape)).clone())
        offset += nbytes
    if offset != flat.numel():
        raise ValueError(f"a flattened bucket of {flat.numel()} bytes does not hold the announced {offset} bytes")
    return out


class ServerCalls:
    """The protocol's HTTP calls to a set of servers, each call sent to all of them in parallel."""

    def __init__(self, api_key: str = "", timeout_s: float = 600.0):
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    def post_all(
        self,
        urls: Sequence[str],
        path: str,
        payload: dict[str, Any] | Callable[[int], dict[str, Any]],
        during: Callable[[], None] | None = None,
    ) -> None:
        """POST `payload` (or payload(i) for server i) to every URL; run `during()` while the requests are in
        flight (the broadcast that the servers are waiting for); raise naming each server that failed."""
        results: list[Any] = [None] * len(urls)

        def call(i: int, url: str) -> None:
            body = payload(i) if callable(payload) else payload
            try:
                r = httpx.post(url + path, json=body, headers=self.headers, timeout=self.timeout_s)
                ok = r.status_code == 200 and (not r.content or r.json().get("success", True))
                results[i] = None if ok else f"HTTP {r.status_code}: {r.text[:300]}"
            except (httpx.HTTPError, ValueError) as err:
                results[i] = f"{type(err).__name__}: {err}"

        threads = [threading.Thread(target=call, args=(i, u), daemon=True) for i, u in enumerate(urls)]
        for t in threads:
            t.start()
        error: BaseException | None = None
        if during is not None:
            try:
                during()
            except Exception as err:  # noqa: BLE001 (report it with the servers' answers below)
                error = err
        for t in threads:
            t.join()
        bad = [f"{u}: {r}" for u, r in zip(urls, results) if r is not None]
        if bad or error is not None:
            cause = f"; the trainer side failed: {error}" if error is not None else ""
            raise WeightSyncError(f"{path} failed on {len(bad)} of {len(urls)} server(s): " + "; ".join(bad) + cause)

    def tp_sizes(self, urls: Sequence[str]) -> list[int]:
        """Ranks each server contributes to a group (its tensor-parallel size, from /server_info)."""
        sizes = []
        for url in urls:
            r = httpx.get(url + "/server_info", headers=self.headers, timeout=30.0)
            if r.status_code != 200:
                raise WeightSyncError(
                    f"{url}/server_info returned {r.status_code}; is it an SGLang server "
                    "(not a router)? rollout.urls must list the servers for weight sync"
                )
            sizes.append(int(r.json().get("tp_size", 1)))
        return sizes

    def versions(self, urls: Sequence[str]) -> dict[str, str]:
        out = {}
        for url in urls:
            r = httpx.get(url + "/model_info", headers=self.headers, timeout=30.0)
            out[url] = str(r.json().get("weight_version")) if r.status_code == 200 else f"HTTP {r.status_code}"
        return out


class StageSender:
    """One pipeline stage's sender: its named group with every server, and the broadcast of its buckets."""

    def __init__(self, stage: int, calls: ServerCalls, host: str, backend: str, timeout_s: float):
        self.stage, self.calls, self.host = stage, calls, host
        self.backend, self.timeout_s = backend, timeout_s
        self.members: list[str] = []
        self.name = ""
        self.group = None

    def connect(self, members: Sequence[str], generation: int) -> None:
        """(Re)build the group over `members` (called by the stage sender whenever membership changed)."""
        self.close()
        sizes = self.calls.tp_sizes(members)
        offsets = [1 + sum(sizes[:i]) for i in range(len(sizes))]
        world_size = 1 + sum(sizes)
        port, name = free_port_on(self.host), group_name(self.stage, generation)

        def payload(i: int) -> dict[str, Any]:
            return {
                "master_address": self.host,
                "master_port": port,
                "rank_offset": offsets[i],
                "world_size": world_size,
                "group_name": name,
                "backend": self.backend,
            }

        box: dict[str, Any] = {}

        def join() -> None:
            box["group"] = init_custom_process_group(self.host, port, world_size, 0, name, self.backend, self.timeout_s)

        self.calls.post_all(members, "/init_weights_update_group", payload, during=join)
        self.group, self.name, self.members = box["group"], name, list(members)

    def send(self, bucket: Sequence[tuple[str, Any]], version: int) -> None:
        """One bucket: announce names / dtypes / shapes to every server, then broadcast the whole bucket as one
        flat byte tensor (SGLang's `load_format: flattened_bucket`: one collective instead of one per tensor)."""
        import torch.distributed as dist

        payload = {
            "names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket],
            "group_name": self.name,
            "flush_cache": True,
            "weight_version": str(version),
            "load_format": "flattened_bucket",
        }
        flat = flatten_bucket([t for _, t in bucket])

        def broadcast() -> None:
            dist.broadcast(flat, src=0, group=self.group)

        self.calls.post_all(self.members, "/update_weights_from_distributed", payload, during=broadcast)

    def close(self) -> None:
        """Forget the current group on this side and on the servers still answering (best effort)."""
        if self.group is None:
            return
        for url in self.members:
            try:
                httpx.post(
                    url + "/destroy_weights_update_group",
                    json={"group_name": self.name},
                    headers=self.calls.headers,
                    timeout=10.0,
                )
            except httpx.HTTPError:
                pass  # a dead server has no group left to destroy
        destroy_group(self.group)
        self.group, self.members = None, []
