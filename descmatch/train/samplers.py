"""How the points of a batch are chosen within a pool: one registry, :data:`SAMPLERS`.

Each entry makes the sampler of one pool (:class:`~descmatch.train.pool.PairPool`) from the
batch size, the :class:`SamplerOptions` and a seed; the sampler's ``batch_points(rng, step)``
gives the batch's point indices, drawn from ``rng`` (and, for ``progressive``, the step):

* ``same-image`` (default, :class:`SameImageSampler`): ``images_per_batch`` photos, many
  points each, so the in-batch negatives are hard;
* ``random`` (HardNet's: :class:`~descmatch.train.pointsamplers.HardNetSampler`): distinct
  points uniformly over the pool;
* ``progressive`` (L2-Net's: :class:`~descmatch.train.pointsamplers.ProgressiveSampler`):
  ``p1_fraction`` of the batch walks a shuffled sequence of the pool, a new one each pass,
  the rest is random;
* ``hard-negative`` (:class:`MinedSampler` over
  :class:`~descmatch.train.pointsamplers.HardNegativeSampler`): groups of ``mine_group`` points
  close in descriptor space, mined with the current net on a bounded random subset of
  ``mine_points`` points (``mines`` is True: :class:`~descmatch.train.batches.MixedBatches`
  describes the subset first).

A new sampler is a function ``(pool, batch_size, options, seed) -> sampler`` added to
:data:`SAMPLERS`; the CLI's ``--sampler`` choices come from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from .pointsamplers import HardNegativeSampler, HardNetSampler, ProgressiveSampler


class PoolSampler(Protocol):
    """The sampler of one pool. Shape: ``batch_points(rng, step)`` -> (B,) point indices."""

    mines: bool

    def batch_points(self, rng: np.random.Generator, step: int) -> np.ndarray: ...


@dataclass(frozen=True)
class SamplerOptions:
    """Settings of the samplers (each uses its own)."""

    images_per_batch: int = 4
    p1_fraction: float = 0.5
    mine_points: int = 32768
    mine_group: int | None = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.p1_fraction <= 1.0:
            raise ConfigError(f"p1_fraction must be in (0, 1], got {self.p1_fraction}")
        if self.mine_points < 2:
            raise ConfigError("mine_points must be >= 2")


class SameImageSampler:
    """Points of a batch from few groups: ``images_per_batch`` groups, drawn with probability
    proportional to their size (so every point is about equally likely), give
    ``batch_size / images_per_batch`` points each; groups too small to give their share give
    all their points and further groups fill the batch. ``images_per_batch=0``, or a pool
    without groups, draws the points uniformly from the whole pool.

    Stateless: ``points(rng)`` only draws from ``rng``. Shape: -> (batch_size,) point indices,
    all distinct.
    """

    mines = False

    def __init__(
        self,
        group_offsets: np.ndarray | None,
        num_points: int,
        batch_size: int,
        images_per_batch: int = 4,
    ) -> None:
        if not 2 <= batch_size <= num_points:
            raise ConfigError(
                f"batch size {batch_size} must be within 2..{num_points} (the "
                "number of training points)"
            )
        self.offsets = None if group_offsets is None else np.asarray(group_offsets, np.int64)
        self.num_points = int(num_points)
        self.batch_size = int(batch_size)
        self.images_per_batch = int(images_per_batch)
        if self.offsets is not None:
            self.sizes = np.diff(self.offsets)
            self.prob = self.sizes / self.sizes.sum()

    def points(self, rng: np.random.Generator) -> np.ndarray:
        b = self.batch_size
        if self.offsets is None or self.images_per_batch <= 0 or len(self.sizes) < 2:
            return rng.choice(self.num_points, b, replace=False)
        share = -(-b // self.images_per_batch)
        # Groups in a random order weighted by size, without replacement (exponential keys,
        # Efraimidis-Spirakis): O(G log G) where numpy's weighted choice is O(G^2).
        with np.errstate(divide="ignore"):
            keys = rng.exponential(size=len(self.sizes)) / self.prob
        order = np.argsort(keys, kind="stable")[: int((self.sizes > 0).sum())]
        out: list[np.ndarray] = []
        need = b
        for g in order:
            take = min(share, int(self.sizes[g]), need)
            out.append(self.offsets[g] + rng.choice(int(self.sizes[g]), take, replace=False))
            need -= take
            if need == 0:
                break
        return np.concatenate(out)

    def batch_points(self, rng: np.random.Generator, step: int) -> np.ndarray:
        """The points of batch ``step``: :meth:`points` (stateless; the step is not used)."""
        return self.points(rng)


def _point_ids(num_points: int) -> np.ndarray:
    """Patch -> point ids of a pool for :mod:`.samplers`: point k's pair is patches 2k, 2k+1,
    so the samplers' point k is the pool's point k. Shape: -> (2*num_points,) int64."""
    return np.repeat(np.arange(num_points, dtype=np.int64), 2)


class MinedSampler:
    """Hard-negative batches of one pool: a :class:`~descmatch.train.samplers.HardNegativeSampler`
    over a random subset of at most ``mine_points`` points (at least ``batch_size``) whose
    descriptors were computed with the current net (:meth:`MixedBatches.mine`); batches are
    groups of ``group_size`` points close in descriptor space (a random seed point and its
    nearest neighbours). A point is described by its first patch; the descriptors are kept as
    float16, as a checkpoint stores them, so a resumed run mines exactly the same batches.

    Shape: ``batch_points(rng, step)`` -> (batch_size,) pool point indices.
    """

    mines = True

    def __init__(
        self, num_points: int, batch_size: int, mine_points: int, group_size: int | None, seed: int
    ) -> None:
        if not 2 <= batch_size <= num_points:
            raise ConfigError(
                f"batch size {batch_size} must be within 2..{num_points} (the "
                "number of training points)"
            )
        self.num_points, self.batch_size = int(num_points), int(batch_size)
        self.subset_size = min(self.num_points, max(int(mine_points), self.batch_size))
        self.group_size = None if group_size is None else max(1, int(group_size))
        self.seed = int(seed)
        self.subset: np.ndarray | None = None
        self.descriptors: np.ndarray | None = None
        self._sampler: HardNegativeSampler | None = None

    def draw_subset(self, rng: np.random.Generator) -> np.ndarray:
        """Points to mine among. Shape: -> (subset_size,) int64, sorted."""
        if self.subset_size == self.num_points:
            return np.arange(self.num_points, dtype=np.int64)
        return np.sort(rng.choice(self.num_points, self.subset_size, replace=False))

    def set_descriptors(self, subset: np.ndarray, descriptors: np.ndarray) -> None:
        """Mine among ``subset`` with these descriptors (one row per point, rounded to float16).
        Shape: subset (S,), descriptors (S,D)."""
        subset = np.asarray(subset, np.int64)
        desc = np.asarray(descriptors).astype(np.float16)
        if desc.ndim != 2 or len(desc) != len(subset):
            raise ValueError(f"descriptors must be ({len(subset)}, D), got {desc.shape}")
        self.subset, self.descriptors = subset, desc
        self._sampler = HardNegativeSampler(
            _point_ids(len(subset)),
            np.repeat(desc.astype(np.float32), 2, axis=0),
            self.batch_size,
            0,
            group_size=self.group_size,
            seed=self.seed,
        )

    def batch_points(self, rng: np.random.Generator, step: int) -> np.ndarray:
        if self._sampler is None or self.subset is None:
            raise RuntimeError(
                "hard-negative batches need descriptors: call MixedBatches.mine first"
            )
        return self.subset[self._sampler.batch_points(rng, step)]


def _check_batch(pool: Any, batch_size: int) -> None:
    if not 2 <= batch_size <= pool.num_points:
        raise ConfigError(
            f"batch size {batch_size} must be within 2..{pool.num_points} "
            f"(the number of training points of {pool.name})"
        )


def _same_image(pool: Any, batch_size: int, o: SamplerOptions, seed: int) -> PoolSampler:
    return SameImageSampler(pool.group_offsets, pool.num_points, batch_size, o.images_per_batch)


def _random(pool: Any, batch_size: int, o: SamplerOptions, seed: int) -> PoolSampler:
    _check_batch(pool, batch_size)
    return HardNetSampler(_point_ids(pool.num_points), batch_size, 0, seed=seed)


def _progressive(pool: Any, batch_size: int, o: SamplerOptions, seed: int) -> PoolSampler:
    _check_batch(pool, batch_size)
    return ProgressiveSampler(
        _point_ids(pool.num_points), batch_size, None, o.p1_fraction, seed=seed
    )


def _hard_negative(pool: Any, batch_size: int, o: SamplerOptions, seed: int) -> PoolSampler:
    _check_batch(pool, batch_size)
    return MinedSampler(pool.num_points, batch_size, o.mine_points, o.mine_group, seed)


#: Sampler name -> ``(pool, batch_size, options, seed) -> sampler``.
SAMPLERS: dict[str, Callable[[Any, int, SamplerOptions, int], PoolSampler]] = {
    "same-image": _same_image,
    "random": _random,
    "progressive": _progressive,
    "hard-negative": _hard_negative,
}


def make_sampler(
    name: str, pool: Any, batch_size: int, options: SamplerOptions, seed: int
) -> PoolSampler:
    """The ``name`` sampler of ``pool`` (ConfigError naming the valid ones when unknown)."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](pool, batch_size, options, seed)


__all__ = [
    "SAMPLERS",
    "SamplerOptions",
    "PoolSampler",
    "make_sampler",
    "SameImageSampler",
    "MinedSampler",
    "HardNetSampler",
    "ProgressiveSampler",
    "HardNegativeSampler",
]
