"""Samplers that know the epoch and the distributed rank.

:class:`EpochSampler` draws one epoch's slice order from ``(seed, epoch)`` alone, so every process
draws the same order and takes its own share (``order[rank::world]``, padded by wrapping so shares
are equal, as ``DistributedSampler``), and a run resumed at epoch e draws what it would have drawn.

- ``all``: every training slice once, shuffled;
- ``balanced``: ``samples_per_epoch`` slices of which a ``positive_share`` are positive (the 5th
  place used about a quarter), drawn without replacement while the pool lasts;
- ``per_study`` (the 5th place's sampler): ``study_slices`` random slices of every study, then
  positive slices, at most ``study_positives`` of one study, as many as ``positive_share`` × the
  negatives among the first draw; the union, shuffled. An epoch is about two slices per study.

:class:`ShardSampler` splits validation rows over processes without padding (every row once).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside distributed runs."""
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
        studies: np.ndarray | None = None,
        study_slices: int = 2,
        study_positives: int = 8,
    ):
        self.positive = np.asarray(positive, dtype=bool)
        if mode not in ("all", "balanced", "per_study"):
            raise ValueError(f"unknown sampling mode {mode!r}")
        if mode == "per_study" and (studies is None or len(studies) != len(self.positive)):
            raise ValueError("per_study sampling needs the study of every slice")
        # Study of each slice as small integers (any hashable ids in).
        self.studies = None if studies is None else np.unique(np.asarray(studies), return_inverse=True)[1]
        self.study_slices = study_slices
        self.study_positives = study_positives
        self._study_total: int | None = None
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
        if self.mode == "per_study":
            # Every epoch as long as the first (np.resize wraps or cuts a few slices): a fixed length
            # for the LR schedule's step count and for processes of a distributed run.
            return np.resize(rng.permutation(self._per_study(rng)), self._total())
        n_pos = int(round(self.samples_per_epoch * self.positive_share))
        picks = np.concatenate(
            [
                _draw(np.flatnonzero(self.positive), n_pos, rng),
                _draw(np.flatnonzero(~self.positive), self.samples_per_epoch - n_pos, rng),
            ]
        )
        return rng.permutation(picks)

    def _per_study(self, rng: np.random.Generator) -> np.ndarray:
        studies = self.studies
        assert studies is not None  # per_study mode: __init__ requires the study of every slice

        def first_of_each_study(rows: np.ndarray, k: int) -> np.ndarray:
            """Of ``rows`` in a random order, the first ``k`` of each study (pandas' groupby.head)."""
            rows = rng.permutation(rows)
            order = np.argsort(studies[rows], kind="stable")
            grouped = rows[order]
            starts = np.r_[0, np.flatnonzero(np.diff(studies[grouped])) + 1]
            rank = np.arange(len(grouped)) - np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
            picked = grouped[rank < k]
            return picked[np.argsort(rng.random(len(picked)))]  # back to a random order

        base = first_of_each_study(np.arange(len(self.positive)), self.study_slices)
        n_positive = int(len(base) * (1 - self.positive[base].mean()) * self.positive_share) if len(base) else 0
        extra = first_of_each_study(np.flatnonzero(self.positive), self.study_positives)[:n_positive]
        return np.union1d(base, extra)

    def _total(self) -> int:
        if self.mode == "per_study":  # the epoch's size varies a little with the draw; the first epoch's stands for all
            if self._study_total is None:
                self._study_total = len(self._per_study(np.random.default_rng([self.seed, 0])))
            return self._study_total
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
