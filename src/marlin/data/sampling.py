"""Batch samplers that make a run independent of how it is split over processes.

Pretraining (:class:`StreamBatchSampler`, step-based): the run reads one endless stream, the concatenation of a
fresh permutation of the dataset per epoch (seeded by (seed, epoch)). Optimiser step ``s`` consumes stream positions
``[s * G, (s + 1) * G)`` with ``G`` the global batch; rank ``r`` micro-step ``m`` takes the contiguous slice ``r * b
* accum + m * b + [0, b)``. So every sample is seen exactly once per epoch over all ranks (batches may straddle an
epoch boundary; nothing is dropped or padded), and 1 process with batch 8 reads the same samples at the same
positions as 2 processes with batch 4 or 1 process with batch 4 and accumulation 2 — which, with masks seeded from
(seed, step, position), makes those runs equal, and makes a resumed run read exactly what the uninterrupted one
would.

Fine-tuning (:class:`ShardedBatchSampler`, epoch-based): each epoch is one seeded permutation cut into global batches
of ``batch_size x world_size``; rank ``r`` takes the ``r``-th slice of each, so every training video is used exactly
once per epoch and N processes with batch b follow one process with batch N x b.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from ..utils.seeding import derive_seed

__all__ = ["BALANCE", "KeyedItems", "ShardedBatchSampler", "StreamBatchSampler", "global_positions"]

BALANCE = ("none", "store", "group")  # how a pretraining run draws its clips (datasets.balance_weights)


def global_positions(step: int, micro: int, batch_size: int, accum_steps: int, rank: int, world_size: int) -> Tensor:
    """Stream positions of one micro-batch: ``[batch_size]`` long (see the module docstring)."""
    global_batch = batch_size * accum_steps * world_size
    first = step * global_batch + rank * batch_size * accum_steps + micro * batch_size
    return torch.arange(first, first + batch_size)


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of dataset indices from `start_step` on (see the module docstring)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        total_steps: int | None = None,
        keys: bool = False,
        weights: Tensor | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.n, self.b, self.accum = num_samples, batch_size, accum_steps
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.keys = keys  # yield (index, step, position) for KeyedItems instead of plain indices
        if weights is not None and (
            len(weights) != num_samples or not bool((weights >= 0).all()) or weights.sum() <= 0
        ):
            raise ValueError(f"expected {num_samples} non-negative sampling weights, not all zero")
        self.weights = weights  # per-item draw probabilities (data.balance); None: a permutation per epoch
        self._perms: dict[int, Tensor] = {}

    def steps_per_epoch(self) -> float:
        return self.n / (self.b * self.accum * self.world)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            if self.weights is None:
                self._perms[epoch] = torch.randperm(self.n, generator=g)
            else:  # n weighted draws: the same for every rank, so DDP and resumed runs still read one stream
                self._perms[epoch] = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        return self._perms[epoch]

    def indices(self, positions: Tensor) -> list[int]:
        return [int(self._perm(int(p) // self.n)[int(p) % self.n]) for p in positions]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            for micro in range(self.accum):
                positions = global_positions(step, micro, self.b, self.accum, self.rank, self.world)
                indices = self.indices(positions)
                if self.keys:
                    yield [(i, step, int(p)) for i, p in zip(indices, positions.tolist(), strict=True)]
                else:
                    yield indices
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an endless StreamBatchSampler has no length")
        return max(0, self.total_steps - self.start_step) * self.accum


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's slice of every global batch of one epoch (see the module docstring).

    Global batch ``g`` is positions ``[g * B * W, (g + 1) * B * W)`` of a permutation seeded by (seed, epoch); rank
    ``r`` takes ``[r * B, (r + 1) * B)`` of it. Only the last global batch can be short, so a rank may run out one
    step early: the trainer then does an empty step to keep the collectives in line.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0):
        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world_size
        g = torch.Generator().manual_seed(derive_seed(seed, "finetune-epoch", epoch))
        self.perm = torch.randperm(n, generator=g).tolist()

    @property
    def global_batch(self) -> int:
        return self.b * self.world

    @property
    def steps(self) -> int:
        """Optimiser steps of the epoch (the same on every rank)."""
        return -(-self.n // self.global_batch)

    def global_count(self, step: int) -> int:
        """Videos in global batch `step`, over all ranks."""
        return min(self.global_batch, self.n - step * self.global_batch)

    def batch(self, step: int) -> list[int]:
        first = step * self.global_batch + self.rank * self.b
        return self.perm[first : min(first + self.b, self.n)]

    def __iter__(self):
        for step in range(self.steps):
            idx = self.batch(step)
            if idx:
                yield idx

    def __len__(self) -> int:
        return sum(1 for s in range(self.steps) if self.batch(s))


class KeyedItems(Dataset):
    """A dataset read by stream keys: ``items[(index, step, position)]`` is item ``index`` in the epoch the position
    falls in (``dataset.item(index, epoch)`` where the dataset draws per epoch, e.g. a random clip start; else
    ``dataset[index]``) plus ``"key": (step, position)``, what :class:`marlin.data.collate.MaskCollator` seeds each
    mask with."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.has_parse = getattr(dataset, "has_parse", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        index, step, position = key
        epoch = position // len(self.dataset)
        item = self.dataset.item(index, epoch) if hasattr(self.dataset, "item") else self.dataset[index]
        return {**item, "key": (step, position)}
