"""Samplers that know the epoch and the distributed rank.

:class:`EpochSampler` draws one epoch's slice order from ``(seed, epoch)`` alone, so every process
draws the same order and takes its own share (``order[rank::world]``, padded by wrapping so shares
are equal, as ``DistributedSampler``), and a run resumed at epoch e draws what it would have drawn.

- ``all``: every training slice once, shuffled;
- ``balanced``: ``samples_per_epoch`` slices of which a ``positive_share`` are positive (the 5th
  place used about a quarter), drawn without replacement while the pool lasts.

:class:`ShardSampler` splits validation rows over processes without padding (every row once).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside distributed runs."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` items of ``pool``: without replacement while it lasts, whole passes then a remainder."""
    if n <= 0 or len(pool) == 0:
        return pool[:0]
    full, rest = divmod(n, len(pool))
    parts = [rng.permutation(pool) for _ in range(full)] + [rng.choice(pool, size=rest, replace=False)]
    return np.concatenate(parts)


class EpochSampler(Sampler[int]):
    def __init__(
        self,
        positive: np.ndarray,
        *,
        mode: str = "all",
        positive_share: float = 0.25,
        samples_per_epoch: int | None = None,
        seed: int = 0,
    ):
        self.positive = np.asarray(positive, dtype=bool)
        if mode not in ("all", "balanced"):
            raise ValueError(f"unknown sampling mode {mode!r}")
        if mode == "balanced" and (self.positive.all() or not self.positive.any()):
            raise ValueError("balanced sampling needs both positive and negative training slices")
        self.mode = mode
        self.positive_share = positive_share
        self.samples_per_epoch = samples_per_epoch or len(self.positive)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """The whole epoch's order (before sharding over processes)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        if self.mode == "all":
            return rng.permutation(len(self.positive))
        n_pos = int(round(self.samples_per_epoch * self.positive_share))
        picks = np.concatenate(
            [
                _draw(np.flatnonzero(self.positive), n_pos, rng),
                _draw(np.flatnonzero(~self.positive), self.samples_per_epoch - n_pos, rng),
            ]
        )
        return rng.permutation(picks)

    def _total(self) -> int:
        return len(self.positive) if self.mode == "all" else self.samples_per_epoch

    def __len__(self) -> int:
        _, size = world()
        return math.ceil(self._total() / size)

    def __iter__(self) -> Iterator[int]:
        rank, size = world()
        order = self.epoch_order()
        per_rank = math.ceil(len(order) / size)
        if per_rank * size > len(order):
            order = np.concatenate([order, order[: per_rank * size - len(order)]])
        return iter(order[rank::size].tolist())


class ShardSampler(Sampler[int]):
    """Rows ``rank, rank + world, …`` in order: each validation row on exactly one process."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        rank, size = world()
        return len(range(rank, self.n, size))

    def __iter__(self) -> Iterator[int]:
        rank, size = world()
        return iter(range(rank, self.n, size))
