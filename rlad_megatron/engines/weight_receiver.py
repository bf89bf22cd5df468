"""`rlad serve`'s side of the distributed weight sync: SGLang 0.5.23's protocol, received on gloo.

Endpoints and their rules, as SGLang's scheduler applies them (managers/scheduler_components/weight_updater.py):
- /init_weights_update_group joins a named group as rank `rank_offset` (one rank: `rlad serve` has TP 1);
  several named groups may coexist (one per trainer pipeline stage); joining a name again replaces that group
  (a restarted trainer rebuilds its groups under the same names).
- /begin_weight_update opens the update window; a second begin before end is refused.
- /update_weights_from_distributed is refused outside the window; inside it receives every announced tensor
  (names / dtypes / shapes) by broadcast from the group's rank 0, in order, one broadcast each, or all in
  one flat byte tensor with `load_format: flattened_bucket` (what the trainer sends).
- /end_weight_update closes the window.
- /destroy_weights_update_group forgets a group.
Updates are handled one at a time, as SGLang's single scheduler thread does.

One difference, on purpose: SGLang loads each received bucket into the live model at once; here the buckets
are held until /end_weight_update and swapped in together while generation is paused, so no request ever
sees half-updated weights (the training loop never generates during a sync, so results are the same).
`backend` must be gloo: NCCL needs GPUs on both ends.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import torch

from rlad_megatron.engines.protocol import RequestError
from rlad_megatron.engines.weight_sync import destroy_group, init_custom_process_group, unflatten_bucket

INIT_FIELDS = {
    "master_address": str,
    "master_port": int,
    "rank_offset": int,
    "world_size": int,
    "group_name": str,
    "backend": str,
}
DTYPES = {"float32", "float16", "bfloat16", "float64"}


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"{name} must be a {kind.__name__}")
    return value


class WeightReceiver:
    def __init__(self, apply, timeout_s: float = 600.0):
        """`apply(named_tensors, version)` swaps the received tensors into the engine (generation paused)."""
        self.apply, self.timeout_s = apply, timeout_s
        self.groups: dict[str, Any] = {}
        self.session: list[tuple[str, torch.Tensor]] | None = None
        self.version: str | None = None
        self.lock = threading.Lock()  # one update call at a time, like SGLang's scheduler

    def init_group(self, body: dict[str, Any]) -> dict[str, Any]:
        args = {k: _field(body, k, t, "gloo" if k == "backend" else None) for k, t in INIT_FIELDS.items()}
        if args["backend"] != "gloo":
            raise RequestError(
                f"backend={args['backend']!r} cannot be honoured by rlad serve (CPU): use 'gloo'; "
                "the trainer picks gloo when it runs on CPU"
            )
        if not 1 <= args["rank_offset"] < args["world_size"]:
            raise RequestError(f"rank_offset={args['rank_offset']} must be in [1, world_size={args['world_size']})")
        name = args["group_name"]
        if name in self.groups:  # a restarted trainer reuses its names: the new group replaces the old, as in SGLang
            destroy_group(self.groups.pop(name))
        self.groups[name] = init_custom_process_group(
            args["master_address"],
            args["master_port"],
            args["world_size"],
            args["rank_offset"],
            name,
            "gloo",
            self.timeout_s,
        )
        return {"success": True, "message": f"joined {name} as rank {args['rank_offset']}"}

    def destroy_group(self, body: dict[str, Any]) -> dict[str, Any]:
        name = _field(body, "group_name", str, "weight_update_group")
        pg = self.groups.pop(name, None)
        if pg is None:
            raise RequestError(f"no weight update group named {name!r}")
        destroy_group(pg)
        return {"success": True, "message": f"destroyed {name}"}

    def begin(self) -> dict[str, Any]:
        with self.lock:
            if self.session is not None:
                raise RequestError("a weight-update session is already open; call end_weight_update() first")
            self.session, self.version = [], None
        return {"success": True, "message": "Success"}

    def receive(self, body: dict[str, Any]) -> dict[str, Any]:
        names, dtypes, shapes = (body.get(k) for k in ("names", "dtypes", "shapes"))
        if not (
            isinstance(names, list)
            and isinstance(dtypes, list)
            and isinstance(shapes, list)
            and len(names) == len(dtypes) == len(shapes)
        ):
            raise RequestError("names, dtypes and shapes must be lists of the same length")
        bad = sorted({d for d in dtypes if d not in DTYPES})
        if bad:
            raise RequestError(f"dtypes {bad} are not supported; use one of {sorted(DTYPES)}")
        name = _field(body, "group_name", str, "weight_update_group")
        load_format = body.get("load_format")
        if load_format not in (None, "flattened_bucket"):
            raise RequestError(f"load_format={load_format!r} is not supported; use none or 'flattened_bucket'")
        with self.lock:
            if self.session is None:
                raise RequestError(
                    "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
                )
            if name not in self.groups:
                raise RequestError(f"no weight update group named {name!r}; call /init_weights_update_group first")
            self.session += zip(map(str, names), self._broadcast(self.groups[name], dtypes, shapes, load_format))
            if body.get("weight_version") is not None:
                self.version = str(body["weight_version"])
        return {"success": True, "message": "Succeeded to update parameter online."}

    @staticmethod
    def _broadcast(group, dtypes: list[str], shapes: list[list[int]], load_format: str | None) -> list[torch.Tensor]:
        """Receive the announced tensors: one broadcast each, or one flat byte tensor for the whole bucket."""
        import torch.distributed as dist

        kinds = [getattr(torch, d) for d in dtypes]
        if load_format == "flattened_bucket":
            flat = torch.empty(sum(math.prod(s) * k.itemsize for k, s in zip(kinds, shapes)), dtype=torch.uint8)
            dist.broadcast(flat, src=0, group=group)
            return unflatten_bucket(flat, kinds, shapes)
        tensors = [torch.empty([int(d) for d in shape], dtype=kind) for kind, shape in zip(kinds, shapes)]
        for tensor in tensors:
            dist.broadcast(tensor, src=0, group=group)
        return tensors

    def end(self) -> dict[str, Any]:
        with self.lock:
            if self.session is None:
                raise RequestError("no weight-update session is open; call begin_weight_update() first")
            received, version, self.session = self.session, self.version, None
            if received:
                self.apply(received, version)
        return {"success": True, "message": "Success"}
