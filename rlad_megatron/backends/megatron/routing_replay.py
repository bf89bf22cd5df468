"""Routing replay for MoE students: the trainer's forward uses the experts the rollout engine chose.

The rollout engine and the trainer compute the router logits with different kernels (and often dtypes);
where two experts are nearly tied, the two pick different top-k experts for the same token, and the
trainer's log-prob of that token no longer describes the policy that sampled it (the importance ratio is
off by the routing flip, not by the update). With `model.routing_replay` the engine returns, per fed
token and MoE layer, the k expert ids it used (`Sample.routed_experts`, [tokens, layers, k]); the packer
lays them beside the tokens (`routed_experts` column, -1 where no engine route exists: row padding,
context-parallel sequence padding, EP filler batches) and every forward of the student (old log-probs and
training steps; not the frozen reference) replays them through Megatron-Core's router replay
(`TransformerConfig.moe_enable_routing_replay`, one `RouterReplay` per router, action REPLAY_FORWARD
with per-layer target indices). The routing *weights* are still the trainer's router probabilities of
those experts (Megatron gathers its own scores at the replayed ids), so the router keeps its gradient.

Which rows a router sees: the tokens of this rank's (context-parallel shard of the) packed row, cut into
TP slices under sequence parallelism; expert parallelism routes before dispatching, so EP ranks each
replay their own micro-batch. Rows without an engine route are given experts 0..k-1 (they carry no loss).

Agreement (cheap monitoring): while replaying, each router also computes its own top-k of the same scores
(`_ComparingReplay`); `agreement()` is the share of (token, layer) pairs whose own expert set equals the
engine's, over the tokens that have engine routes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def _comparing_replay_class():
    from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

    class _ComparingReplay(RouterReplay):
        """Megatron's RouterReplay that, while replaying, also records the router's own top-k (for agreement)."""

        def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                with torch.no_grad():
                    self.record_indices(default_compute_topk(scores, topk, num_groups, group_topk)[1])
            return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)

    return _ComparingReplay


class ReplayRouters:
    """The RouterReplay of every MoE layer of one model chunk, by global layer index (0-based)."""

    def __init__(self, chunk: torch.nn.Module):
        from megatron.core.transformer.moe.router import TopKRouter

        comparing = _comparing_replay_class()
        self.layers: list[tuple[int, Any]] = []  # (layer, its Megatron RouterReplay, imported lazily)
        for module in chunk.modules():
            if isinstance(module, TopKRouter) and module.router_replay is not None:
                module.router_replay.__class__ = comparing  # same state, plus the agreement record
                self.layers.append((int(module.layer_number) - 1, module.router_replay))
        if not self.layers:
            raise ValueError("routing replay: the model has no MoE router built with moe_enable_routing_replay")
        self.topk = 0
        self.counts = torch.zeros(2, dtype=torch.float64)
        """(token-layer pairs whose own top-k set equals the engine's, pairs with an engine route)."""

    @contextlib.contextmanager
    def replaying(self, routes: torch.Tensor):
        """Forwards inside use `routes` ([router tokens, num_layers, k], -1 rows: no route) as every layer's top-k."""
        from megatron.core.transformer.moe.router_replay import RouterReplayAction

        routes = routes.long()
        has_route = routes[:, 0, 0] >= 0
        k = routes.shape[-1]
        filler = torch.arange(k, device=routes.device).expand(routes.shape[0], k)
        targets = {}
        for layer, replay in self.layers:
            target = torch.where(has_route[:, None], routes[:, layer], filler)
            targets[layer] = target
            replay.set_target_indices(target)
            replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        try:
            yield
            self._count(targets, has_route)
        finally:
            for _, replay in self.layers:
                replay.clear_indices()
                replay.clear_router_replay_action()

    def _count(self, targets: dict[int, torch.Tensor], has_route: torch.Tensor) -> None:
        for layer, replay in self.layers:
            own = replay.get_recorded_indices()
            if own is None:
                continue
            same = (own.sort(-1).values == targets[layer].sort(-1).values).all(-1) & has_route
            self.counts += torch.tensor([float(same.sum()), float(has_route.sum())], dtype=torch.float64)


def router_rows(routes: torch.Tensor, tp_rank: int, tp_size: int, sequence_parallel: bool) -> torch.Tensor:
    """The rows of a packed row's routes ([T, layers, k]) this rank's routers see: the TP slice under
    sequence parallelism (the row is split evenly, token_multiple guarantees it), else all of them."""
    if not sequence_parallel or tp_size == 1:
        return routes
    share = routes.shape[0] // tp_size
    return routes[tp_rank * share : (tp_rank + 1) * share]
