"""Deterministic, resumable prompt order.

Epoch e visits the records in a permutation drawn from `random.Random((seed, e))` (or file order
when shuffle=False). `state_dict()` is (epoch, position); a sampler restored from it continues
with exactly the batches the uninterrupted run would have drawn. Batches cross epoch boundaries.

Left out: per-rank sharding; one sampler (on the rank that drives rollouts) draws for the step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any


class PromptSampler:
    def __init__(self, dataset: Sequence[Any], seed: int = 0, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise ValueError("PromptSampler needs a non-empty dataset")
        self.dataset, self.seed, self.shuffle = dataset, int(seed), bool(shuffle)
        self.epoch, self.position = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Any]:
        """The next n records (n >= 1), wrapping into the next epoch when needed."""
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        batch: list[Any] = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            take = min(n - len(batch), len(self._order) - self.position)
            batch.extend(self.dataset[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_records": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        expected = {"seed": self.seed, "shuffle": int(self.shuffle), "num_records": len(self.dataset)}
        found = {k: state.get(k) for k in expected}
        if found != expected:
            raise ValueError(
                f"sampler state {found} does not match this dataset/sampler {expected}; "
                "resume with the same data, seed and data.shuffle"
            )
        if not 0 <= state["position"] <= len(self.dataset):
            raise ValueError(f"sampler state position {state['position']} is outside 0..{len(self.dataset)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._order_of(self.epoch)
