"""Batch samplers of matching patch pairs.

A dataset is described by ``point_ids`` (M,): one entry per patch, patches of the same 3D point
share an id. Only points with at least two patches can form a pair; the others are ignored.
Every sampler is an iterable of ``num_batches`` batches, each an int64 array (B,2) of patch
indices: row ``(anchor, positive)`` holds two distinct patches of one point and all rows of a
batch belong to distinct points. Within a row the two patches are drawn uniformly (without
replacement) among the patches of the point.

Sampling is deterministic: iterating draws from ``numpy.random.default_rng([seed, epoch])``, so
two passes give the same batches until ``set_epoch`` changes the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class _PairSampler:
    """Index of the patches of each point, and the drawing of a pair per point."""

    #: Whether the sampler needs descriptors first (see :mod:`.samplers`).
    mines = False

    def __init__(self, point_ids: np.ndarray, batch_size: int, num_batches: int, seed: int) -> None:
        ids = np.asarray(point_ids)
        if ids.ndim != 1:
            raise ValueError(f"point_ids must be 1-D (M,); got shape {ids.shape}")
        order = np.argsort(ids, kind="stable")
        unique, start, count = np.unique(ids[order], return_index=True, return_counts=True)
        keep = count >= 2
        self._order = order.astype(np.int64)
        self._all_start = start.astype(np.int64)
        self._usable = np.flatnonzero(keep)
        self._start = start[keep].astype(np.int64)
        self._count = count[keep].astype(np.int64)
        #: Ids of the usable points (at least two patches), sorted; sampled point k is this[k].
        self.point_ids_used = unique[keep]
        self.num_points = int(keep.sum())
        if not 1 <= batch_size <= self.num_points:
            raise ValueError(
                f"batch_size {batch_size} must be within 1..{self.num_points} "
                "(the number of points with at least two patches)"
            )
        if num_batches < 0:
            raise ValueError(f"num_batches must be >= 0; got {num_batches}")
        self.batch_size = int(batch_size)
        self.num_batches = int(num_batches)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use another random stream (for example one per training epoch)."""
        self.epoch = int(epoch)

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _pairs(self, rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
        """Two distinct random patches of each point. Shape: (B,) point indices -> (B,2)."""
        count = self._count[points]
        start = self._start[points]
        first = rng.integers(0, count)
        second = rng.integers(0, count - 1)
        second = second + (second >= first)
        pairs = np.stack([self._order[start + first], self._order[start + second]], axis=1)
        return pairs.astype(np.int64, copy=False)

    def _batch_points(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        raise NotImplementedError

    def batch_points(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """The points of batch ``batch`` (indices into :attr:`point_ids_used`), drawn from
        ``rng``: what iterating yields pairs of, for callers that gather the pairs themselves
        (the training loop's pools). Shape: -> (batch_size,) int64, all distinct."""
        return np.asarray(self._batch_points(rng, int(batch)), np.int64)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = self._rng()
        for b in range(self.num_batches):
            yield self._pairs(rng, self._batch_points(rng, b))


class HardNetSampler(_PairSampler):
    """HardNet's sampling: each batch holds ``batch_size`` distinct points drawn uniformly.

    Shape: each batch (batch_size, 2) int64 patch indices.
    """

    def __init__(
        self, point_ids: np.ndarray, batch_size: int, num_batches: int, seed: int = 0
    ) -> None:
        super().__init__(point_ids, batch_size, num_batches, seed)

    def _batch_points(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        return rng.choice(self.num_points, size=self.batch_size, replace=False)


class ProgressiveSampler(_PairSampler):
    """L2-Net's progressive sampling.

    The points are put in one shuffled sequence per iteration pass. Batch ``b`` takes the
    ``p1`` points at sequence positions ``b*p1 .. b*p1 + p1 - 1`` (cyclically) as its first
    ``p1`` rows, then ``p2 = batch_size - p1`` points drawn uniformly without replacement from
    the other points. ``p1 = round(p1_fraction * batch_size)``, at least 1; the default
    ``p1_fraction=0.5`` (half sequential, half random) is our choice, not a value from the paper.
    ``num_batches=None`` means one pass over the sequence: ``ceil(num_points / p1)`` batches
    (when ``p1`` does not divide the number of points, the last batch wraps around to the start).

    Shape: each batch (batch_size, 2) int64 patch indices; rows ``:p1`` are the sequential
    points, rows ``p1:`` the random ones.
    """

    def __init__(
        self,
        point_ids: np.ndarray,
        batch_size: int,
        num_batches: int | None = None,
        p1_fraction: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not 0.0 < p1_fraction <= 1.0:
            raise ValueError(f"p1_fraction must be in (0, 1]; got {p1_fraction}")
        super().__init__(point_ids, batch_size, 0 if num_batches is None else num_batches, seed)
        self.p1 = min(self.batch_size, max(1, int(round(p1_fraction * self.batch_size))))
        self.p2 = self.batch_size - self.p1
        #: Batches in one pass over the sequence.
        self.batches_per_pass = -(-self.num_points // self.p1)
        if num_batches is None:
            self.num_batches = self.batches_per_pass
        self._sequences: dict[int, np.ndarray] = {}

    def sequence(self, epoch: int) -> np.ndarray:
        """The shuffled sequence of pass ``epoch`` (the one iterating after ``set_epoch(epoch)``
        walks). Shape: -> (num_points,) int64."""
        seq = self._sequences.get(int(epoch))
        if seq is None:
            seq = np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_points)
            self._sequences = {int(epoch): seq}  # one pass at a time is enough
        return seq

    def _batch_points(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        """Batch ``batch`` of an endless run of passes: pass ``batch // batches_per_pass``
        walks its own shuffled sequence (:meth:`sequence`), ``p1`` points per batch (the last
        batch of a pass wraps around to its start), and ``p2`` random other points are drawn
        from ``rng``."""
        epoch, b = divmod(int(batch), self.batches_per_pass)
        n = self.num_points
        positions = b * self.p1 + np.arange(self.p1)
        if self.p2:
            rest = rng.choice(n - self.p1, size=self.p2, replace=False)
            positions = np.concatenate([positions, b * self.p1 + self.p1 + rest])
        return self.sequence(epoch)[positions % n]

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = self._rng()
        sequence = rng.permutation(self.num_points)
        n = self.num_points
        for b in range(self.num_batches):
            positions = b * self.p1 + np.arange(self.p1)
            if self.p2:
                rest = rng.choice(n - self.p1, size=self.p2, replace=False)
                positions = np.concatenate([positions, b * self.p1 + self.p1 + rest])
            yield self._pairs(rng, sequence[positions % n])


def _nearest(
    x: np.ndarray, sq_norm: np.ndarray, query: np.ndarray, k: int, chunk_size: int
) -> np.ndarray:
    """Indices of the ``k`` rows of ``x`` nearest to ``query``, nearest first.

    Distances are computed ``chunk_size`` rows at a time, keeping the best ``k`` so far, so the
    memory is O(k + chunk_size) whatever the number of rows.

    Shape: x (n,D), sq_norm (n,), query (D,) -> (k,) int64.
    """
    n = x.shape[0]
    k = min(k, n)
    best_idx = np.empty(0, dtype=np.int64)
    best_d = np.empty(0, dtype=np.float64)
    for lo in range(0, n, chunk_size):
        hi = min(n, lo + chunk_size)
        d = sq_norm[lo:hi] - 2.0 * (x[lo:hi] @ query)  # + |query|^2, the same for every row
        cand_d = np.concatenate([best_d, d.astype(np.float64)])
        cand_i = np.concatenate([best_idx, np.arange(lo, hi, dtype=np.int64)])
        if cand_d.size > k:
            keep = np.argpartition(cand_d, k - 1)[:k]
            cand_d, cand_i = cand_d[keep], cand_i[keep]
        best_d, best_idx = cand_d, cand_i
    return best_idx[np.argsort(best_d, kind="stable")]


class HardNegativeSampler(_PairSampler):
    """Batches of confusable points, mined from precomputed descriptors.

    Each point is described by the mean of its patches' descriptors, L2-normalised. A batch is
    built group by group: a seed point is drawn uniformly among the points not yet in the batch,
    and the group is the seed plus its ``group_size - 1`` nearest points (Euclidean, in
    descriptor space) not yet in the batch. ``group_size=None`` means one group per batch (the
    seed and its ``batch_size - 1`` nearest points). The neighbours are searched in chunks of
    ``chunk_size`` points, so no (M,M) matrix is ever formed; each group costs O(M D) time.
    Call ``update_descriptors`` to mine with newer descriptors (for example every epoch).

    Shape: descriptors (M,D), one row per patch in the order of ``point_ids``; each batch
    (batch_size, 2) int64 patch indices, rows of a group consecutive and seed first.
    """

    def __init__(
        self,
        point_ids: np.ndarray,
        descriptors: np.ndarray,
        batch_size: int,
        num_batches: int,
        group_size: int | None = None,
        seed: int = 0,
        chunk_size: int = 8192,
    ) -> None:
        super().__init__(point_ids, batch_size, num_batches, seed)
        self.group_size = self.batch_size if group_size is None else int(group_size)
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1; got {group_size}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self._num_patches = int(np.asarray(point_ids).shape[0])
        self.update_descriptors(descriptors)

    def update_descriptors(self, descriptors: np.ndarray) -> None:
        """Recompute the point descriptors. Shape: descriptors (M,D), M = len(point_ids)."""
        desc = np.asarray(descriptors, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[0] != self._num_patches:
            raise ValueError(
                f"descriptors must be ({self._num_patches}, D), one row per patch; got {desc.shape}"
            )
        # Per-point sums over every point (reduceat needs all group starts), then the usable ones.
        sums = np.add.reduceat(desc[self._order], self._all_start, axis=0)[self._usable]
        mean = sums / self._count[:, None].astype(np.float32)
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        self._points_desc = mean / np.maximum(norm, 1e-12)
        self._sq_norm = (self._points_desc.astype(np.float64) ** 2).sum(axis=1)

    def _draw_seed(self, rng: np.random.Generator, used: np.ndarray) -> int:
        for _ in range(64):
            s = int(rng.integers(self.num_points))
            if not np.any(used == s):
                return s
        free = np.setdiff1d(np.arange(self.num_points), used)
        return int(rng.choice(free))

    def _batch_points(self, rng: np.random.Generator, batch: int) -> np.ndarray:
        used = np.empty(0, dtype=np.int64)
        while used.size < self.batch_size:
            need = min(self.group_size, self.batch_size - used.size)
            seed = self._draw_seed(rng, used)
            taken = np.append(used, seed)
            # Of taken.size + need candidates at most taken.size are taken: need - 1 remain.
            cand = _nearest(
                self._points_desc,
                self._sq_norm,
                self._points_desc[seed],
                k=taken.size + need,
                chunk_size=self.chunk_size,
            )
            cand = cand[~np.isin(cand, taken)][: need - 1]
            used = np.concatenate([taken, cand])
        return used
