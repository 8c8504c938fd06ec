"""Pools of matching patch pairs: storage and serving.

A pool is a folder:

* ``pairs.npy``: (K,2,P,P) uint8, pair k = the two patches of point k (memory-mappable);
* ``meta.json``: format, patch size, ``mr_size``, window factor, the generation settings, the
  images and ``offsets`` (G+1,): the pairs of image g are rows ``offsets[g]:offsets[g+1]``.

:mod:`.poolbuild` makes them from photos; :mod:`.multiview` and :mod:`.hpatches` from
multi-view scenes and HPatches sequences. :class:`PairPool` serves a pool's pairs as uint8
batches (points and groups: a group is the points of one photo, hard negatives for each
other); :class:`BrownPairPool` serves the Brown/PhotoTour patches through the same interface
(a point's two patches are drawn at random among its patches). How the points of a batch are
chosen is the samplers' job (:mod:`.samplers`, :mod:`.batches`). Pools are read with
``numpy.load`` without pickles: a file holding Python objects is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

import numpy as np

from ..errors import ConfigError, InputError

POOL_FORMAT = "descmatch-pairpool"
POOL_VERSION = 1
PAIRS_FILE = "pairs.npy"
META_FILE = "meta.json"
PARTS_DIR = "parts"
VIEWS_FILE = "views.npy"
VIEW_OFFSETS_FILE = "view_offsets.npy"
TRACKS_FILE = "tracks.npz"


def is_pool(path: str | Path) -> bool:
    """Whether ``path`` is a finished pool folder."""
    p = Path(path)
    return (p / META_FILE).is_file() and (p / PAIRS_FILE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    """A pool's ``meta.json`` (one-line InputError when it is not a JSON object)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path / META_FILE}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path / META_FILE}: not a pool description")
    return meta


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    """A ``.npy`` array of a pool, memory-mapped; never unpickled (one-line InputError for a
    file holding Python objects, or one that is not a ``.npy`` array)."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InputError(f"{path}: not a pool array ({first})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.hasobject:
        raise InputError(f"{path}: not a pool array")
    return arr


class PairPool:
    """Matching pairs in points and groups, served as uint8 batches.

    A point is one matching pair; a group is a set of points that make hard negatives for each
    other (the pairs of one photo). ``point_rows`` maps point index to the row of the backing
    array; ``group_offsets`` (G+1,) splits the points into groups, or is None (no groups).

    Shape: ``gather(points, rng)`` (B,) -> (B,2,P,P) uint8.
    """

    kind = "photos"

    def __init__(
        self,
        pairs: np.ndarray,
        group_offsets: np.ndarray | None,
        meta: dict[str, Any] | None = None,
        name: str = "pool",
        point_rows: np.ndarray | None = None,
    ) -> None:
        if pairs.ndim not in (4, 5) or pairs.shape[1] != 2 or pairs.shape[-1] != pairs.shape[-2]:
            raise ValueError(f"pairs must be (K,2,P,P) or (K,2,V,P,P), got {pairs.shape}")
        self.pairs = pairs
        self._init_points(len(pairs), group_offsets, meta, name, point_rows)

    def _init_points(
        self,
        rows: int,
        group_offsets: np.ndarray | None,
        meta: dict[str, Any] | None,
        name: str,
        point_rows: np.ndarray | None,
    ) -> None:
        """Points (``point_rows``, default all ``rows`` rows of the backing array), groups,
        meta, name; no crop."""
        self.meta = dict(meta or {})
        self.name = name
        self.point_rows = (
            np.arange(rows, dtype=np.int64)
            if point_rows is None
            else np.asarray(point_rows, np.int64)
        )
        self.group_offsets = None if group_offsets is None else np.asarray(group_offsets, np.int64)
        if self.group_offsets is not None and self.group_offsets[-1] != len(self.point_rows):
            raise ValueError("group offsets do not cover the points")
        self.crop: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> PairPool:
        """Open a pool folder (the pairs memory-mapped, read-only)."""
        path = Path(path)
        if not is_pool(path):
            raise InputError(f"{path}: not a pair pool (no {META_FILE} and {PAIRS_FILE})")
        meta = read_meta(path)
        if meta.get("format") != POOL_FORMAT or meta.get("version") != POOL_VERSION:
            raise InputError(
                f"{path}: pool format {meta.get('format')} v{meta.get('version')}"
                f" is not {POOL_FORMAT} v{POOL_VERSION}"
            )
        pairs = load_array(path / PAIRS_FILE)
        if pairs.dtype != np.uint8 or len(pairs) != meta.get("num_pairs"):
            raise InputError(
                f"{path}: {PAIRS_FILE} holds {len(pairs)} pairs, meta says {meta['num_pairs']}"
            )
        return cls(pairs, np.asarray(meta["offsets"], np.int64), meta, name=str(path))

    @staticmethod
    def from_brown(dataset: Any, name: str | None = None) -> BrownPairPool:
        """A pool over a :class:`~descmatch.train.brown.BrownDataset` (points with >= 2 patches)."""
        return BrownPairPool(
            dataset.patches,
            dataset.point_ids,
            name=name or f"brown:{dataset.root}",
            meta={"kind": "brown", "patch_size": dataset.patch_size, "source": str(dataset.root)},
        )

    @property
    def patch_size(self) -> int:
        return int(self.crop or self.pairs.shape[-1])

    def center_crop(self, size: int) -> PairPool:
        """The same pool serving the central ``size`` x ``size`` pixels of each patch (a 64-px
        pool with window factor 2 serves 32-px nets this way)."""
        full = int(self.pairs.shape[-1])
        if not 0 < size <= full or (full - size) % 2:
            raise ConfigError(f"cannot crop {full}-px patches to {size} px")
        out = self.subset(np.arange(self.num_points), self.group_offsets)
        out.crop = None if size == full else size
        return out

    @property
    def num_points(self) -> int:
        return int(len(self.point_rows))

    @property
    def num_groups(self) -> int:
        return 0 if self.group_offsets is None else int(len(self.group_offsets) - 1)

    def __len__(self) -> int:
        return self.num_points

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, points={self.num_points}, "
            f"groups={self.num_groups}, patch_size={self.patch_size})"
        )

    def gather(self, points: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The pairs of these points (rows read in sorted order: fast on a memory map).

        Shape: (B,) -> (B,2,P,P) uint8.
        """
        rows = self.point_rows[np.asarray(points, np.int64)]
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), 2, self.patch_size, self.patch_size), np.uint8)
        got = self.pairs[rows[order]]
        if self.crop:
            c0 = (got.shape[-1] - self.crop) // 2
            got = got[..., c0 : c0 + self.crop, c0 : c0 + self.crop]
        out[order] = got
        return out

    def subset(self, points: np.ndarray, group_offsets: np.ndarray | None) -> PairPool:
        """A pool of some of the points (same backing array)."""
        out = PairPool(
            self.pairs,
            group_offsets,
            self.meta,
            self.name,
            self.point_rows[np.asarray(points, np.int64)],
        )
        out.crop = self.crop
        return out

    def split(self, val_fraction: float, seed: int = 0) -> tuple[PairPool, PairPool]:
        """Hold out whole groups (photos; points when there are no groups) for validation:
        about ``val_fraction`` of them, at least one, drawn with ``seed``."""
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0,1), got {val_fraction}")
        rng = np.random.default_rng([seed, 11])
        if self.group_offsets is None:
            perm = rng.permutation(self.num_points)
            k = max(1, round(val_fraction * self.num_points))
            return (self.subset(np.sort(perm[k:]), None), self.subset(np.sort(perm[:k]), None))
        g = self.num_groups
        if g < 2:
            raise ConfigError(
                f"{self.name}: one image cannot be split into training and "
                "validation; give a validation set"
            )
        sizes = np.diff(self.group_offsets)
        perm = rng.permutation(g)
        k = max(1, round(val_fraction * g))
        parts = []
        for groups in (np.sort(perm[k:]), np.sort(perm[:k])):
            pts = (
                np.concatenate(
                    [np.arange(self.group_offsets[i], self.group_offsets[i + 1]) for i in groups]
                )
                if len(groups)
                else np.zeros(0, np.int64)
            )
            offs = np.concatenate([[0], np.cumsum(sizes[groups])])
            parts.append(self.subset(pts, offs))
        return parts[0], parts[1]

    def verification_set(
        self, num_points: int, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Patches and balanced verification pairs for FPR95: every chosen point gives one
        matching pair and one non-matching pair whose other patch is of another chosen point of
        the same group when there is one (a hard negative), else of a random one.

        Shape: -> patches (2n,P,P) uint8, idx0 (2n,), idx1 (2n,) int64, is_match (2n,) bool.
        """
        rng = np.random.default_rng([seed, 13])
        n = min(num_points, self.num_points)
        if n < 2:
            raise ConfigError(f"{self.name}: a verification set needs at least 2 points")
        pts = np.sort(rng.choice(self.num_points, n, replace=False))
        pairs = self.gather(pts, rng)
        patches = pairs.reshape(2 * n, self.patch_size, self.patch_size)
        a = np.arange(n) * 2
        if self.group_offsets is not None:
            grp = np.searchsorted(self.group_offsets, pts, side="right") - 1
        else:
            grp = np.zeros(n, np.int64)
        # The next chosen point of the same group (cyclically); points alone in their group
        # take a random other point.
        first = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
        size = np.diff(np.r_[first, n])
        run = np.repeat(np.arange(len(first)), size)
        pos = np.arange(n) - first[run]
        other = first[run] + (pos + 1) % size[run]
        alone = size[run] == 1
        if alone.any():
            shift = rng.integers(1, n, alone.sum())
            other[alone] = (np.flatnonzero(alone) + shift) % n
        idx0 = np.concatenate([a, a])
        idx1 = np.concatenate([a + 1, other * 2 + 1])
        is_match = np.r_[np.ones(n, bool), np.zeros(n, bool)]
        return patches, idx0, idx1, is_match


class BrownPairPool(PairPool):
    """Brown/PhotoTour patches as a pair pool: point k is the k-th point id with at least two
    patches, and each time it is gathered its two patches are drawn at random (without
    replacement) among that point's patches. No groups (batches draw points uniformly)."""

    kind = "brown"

    def __init__(
        self,
        patches: np.ndarray,
        point_ids: np.ndarray,
        name: str = "brown",
        meta: dict[str, Any] | None = None,
        points: np.ndarray | None = None,
    ) -> None:
        if patches.ndim != 3 or patches.shape[1] != patches.shape[2]:
            raise ValueError(f"patches must be (M,P,P), got {patches.shape}")
        self.patches = patches
        self.point_ids = np.asarray(point_ids)
        ids = self.point_ids
        order = np.argsort(ids, kind="stable")
        _, start, count = np.unique(ids[order], return_index=True, return_counts=True)
        keep = count >= 2
        self._order = order.astype(np.int64)
        self._start_all = start[keep].astype(np.int64)
        self._count_all = count[keep].astype(np.int64)
        self._points = (
            np.arange(int(keep.sum()), dtype=np.int64)
            if points is None
            else np.asarray(points, np.int64)
        )
        self.meta = dict(meta or {})
        self.name = name
        self.group_offsets = None
        self.point_rows = self._points
        p = patches.shape[-1]
        self.pairs = np.zeros((0, 2, p, p), np.uint8)  # unused: patches are drawn per point
        self.crop = None

    @property
    def patch_size(self) -> int:
        return int(self.patches.shape[-1])

    def gather(self, points: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        p = self._points[np.asarray(points, np.int64)]
        count, start = self._count_all[p], self._start_all[p]
        first = rng.integers(0, count)
        second = rng.integers(0, count - 1)
        second = second + (second >= first)
        idx = np.stack([self._order[start + first], self._order[start + second]], 1)
        return self.patches[idx]

    def subset(self, points: np.ndarray, group_offsets: np.ndarray | None) -> BrownPairPool:
        out = BrownPairPool.__new__(BrownPairPool)
        out.__dict__.update(self.__dict__)
        out._points = self._points[np.asarray(points, np.int64)]
        out.point_rows = out._points
        return out


class MultiviewPairPool(PairPool):
    """A multi-view pool served with a fresh view per gather: point k's pair is its anchor
    patch and one of its other views drawn at random (uniformly), so every batch sees new view
    combinations. Groups are the anchor images (hard negatives, as for photo pools).

    Shape: ``gather(points, rng)`` (B,) -> (B,2,P,P) uint8.
    """

    kind = "multiview"

    def __init__(
        self,
        views: np.ndarray,
        view_offsets: np.ndarray,
        group_offsets: np.ndarray | None,
        meta: dict[str, Any] | None = None,
        name: str = "multiview",
        point_rows: np.ndarray | None = None,
        pairs: np.ndarray | None = None,
    ) -> None:
        if views.ndim not in (3, 4) or views.shape[-1] != views.shape[-2]:
            raise ValueError(f"views must be (M,P,P) or (M,V,P,P), got {views.shape}")
        self.views = views
        self.view_offsets = np.asarray(view_offsets, np.int64)
        if (np.diff(self.view_offsets) < 2).any() or self.view_offsets[-1] != len(views):
            raise ValueError("view offsets must give every point >= 2 views and cover them")
        p = views.shape[-1]
        self.pairs = pairs if pairs is not None else np.zeros((0, 2, p, p), np.uint8)
        self._init_points(len(self.view_offsets) - 1, group_offsets, meta, name, point_rows)

    @classmethod
    def load(cls, path: str | Path) -> MultiviewPairPool:
        """Open a multi-view pool folder (memory-mapped, read-only)."""
        path = Path(path)
        if not is_pool(path):
            raise InputError(f"{path}: not a pair pool (no {META_FILE} and {PAIRS_FILE})")
        meta = read_meta(path)
        if (
            meta.get("format") != POOL_FORMAT
            or meta.get("version") != POOL_VERSION
            or meta.get("kind") != "multiview"
        ):
            raise InputError(f"{path}: not a {POOL_FORMAT} v{POOL_VERSION} multi-view pool")
        for f in (VIEWS_FILE, VIEW_OFFSETS_FILE):
            if not (path / f).is_file():
                raise InputError(f"{path}: the multi-view pool has no {f}")
        views = load_array(path / VIEWS_FILE)
        offsets = np.asarray(load_array(path / VIEW_OFFSETS_FILE, mmap=False), np.int64)
        if len(offsets) - 1 != meta["num_pairs"] or len(views) != meta.get("num_views"):
            raise InputError(f"{path}: {VIEWS_FILE}/{VIEW_OFFSETS_FILE} do not fit meta.json")
        pairs = load_array(path / PAIRS_FILE)
        return cls(
            views, offsets, np.asarray(meta["offsets"], np.int64), meta, name=str(path), pairs=pairs
        )

    @property
    def patch_size(self) -> int:
        return int(self.crop or self.views.shape[-1])

    def gather(self, points: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = rng if rng is not None else np.random.default_rng()
        rows = self.point_rows[np.asarray(points, np.int64)]
        start = self.view_offsets[rows]
        count = self.view_offsets[rows + 1] - start
        second = start + 1 + rng.integers(0, count - 1)
        idx = np.stack([start, second], 1).reshape(-1)
        order = np.argsort(idx, kind="stable")
        got = self.views[idx[order]]
        if self.crop:
            c0 = (got.shape[-1] - self.crop) // 2
            got = got[..., c0 : c0 + self.crop, c0 : c0 + self.crop]
        flat = np.empty((len(idx), *got.shape[1:]), np.uint8)
        flat[order] = got
        return flat.reshape(len(rows), 2, *got.shape[1:])

    def subset(self, points: np.ndarray, group_offsets: np.ndarray | None) -> Self:
        out = type(self).__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.point_rows = self.point_rows[np.asarray(points, np.int64)]
        out.group_offsets = None if group_offsets is None else np.asarray(group_offsets, np.int64)
        return out
