"""Pools of matching patch pairs for training, and the composition of their batches.

A pool is a folder:

* ``pairs.npy``: (K,2,P,P) uint8, pair k = the two patches of point k (memory-mappable);
* ``meta.json``: format, patch size, ``mr_size``, window factor, the generation settings, the
  images and ``offsets`` (G+1,): the pairs of image g are rows ``offsets[g]:offsets[g+1]``.

:func:`build_pool` makes one from folders of photos (see :mod:`.photos`), resumably: images are
done in chunks, each chunk written to ``parts/`` atomically (temporary name + rename), and
finished chunks are skipped when the build runs again; the final ``pairs.npy`` and ``meta.json``
are also written under temporary names and renamed. Each image draws from its own random
stream ``default_rng([seed, image index])``, so the pool does not depend on chunking, workers
or interruptions.

:class:`PairPool` serves batches from a pool; :class:`BrownPairPool` serves the Brown/PhotoTour
patches through the same interface (a point's two patches are drawn at random among its
patches). :class:`SameImageSampler` composes batches from a few images (groups) so that the
in-batch negatives are hard; :class:`MixedBatches` mixes several pools with weights (one pool
per batch, so a batch never mixes easy cross-source negatives in) and composes each pool's
batches with one of :data:`SAMPLERS`: ``same-image`` (the default, :class:`SameImageSampler`),
``random`` (HardNet's: distinct points uniformly over the pool,
:class:`~descmatch.train.samplers.HardNetSampler`), ``progressive`` (L2-Net's:
:class:`~descmatch.train.samplers.ProgressiveSampler`) or ``hard-negative`` (points close in
descriptor space, :class:`MinedSampler` over
:class:`~descmatch.train.samplers.HardNegativeSampler`, mined again every ``mine_every``
steps with the current net on a bounded random subset of the pool).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ImageReadError, InputError, OutputError
from ..images import list_images
from ..patches import DEFAULT_MR_SIZE
from .photos import PhotoPairConfig, load_photo, photo_pairs
from .samplers import HardNegativeSampler, HardNetSampler, ProgressiveSampler

log = logging.getLogger(__name__)

POOL_FORMAT = "descmatch-pairpool"
POOL_VERSION = 1
PAIRS_FILE = "pairs.npy"
META_FILE = "meta.json"
PARTS_DIR = "parts"
#: How the points of a batch are chosen within its pool (see :class:`MixedBatches`).
SAMPLERS = ("same-image", "random", "progressive", "hard-negative")

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------
# Building


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def part_done(parts: Path, chunk: int) -> bool:
    """Whether part ``chunk`` of a pool build is complete (its info file is written last)."""
    return (parts / f"part_{chunk:05d}.json").is_file()


def write_part(parts: Path, chunk: int, data: np.ndarray, info: dict[str, Any]) -> None:
    """One finished chunk of a pool build: its pairs, then its info (crash-safe: a part
    counts as done only once both are in place)."""
    _atomic_save_npy(parts / f"part_{chunk:05d}.npy", data)
    _atomic_write_text(parts / f"part_{chunk:05d}.json", json.dumps(info))


def read_parts(parts: Path, num_parts: int) -> list[dict[str, Any]]:
    """The info of parts 0 .. ``num_parts`` - 1, in order."""
    return [json.loads((parts / f"part_{c:05d}.json").read_text()) for c in range(num_parts)]


def is_pool(path: str | Path) -> bool:
    """Whether ``path`` is a finished pool folder."""
    p = Path(path)
    return (p / META_FILE).is_file() and (p / PAIRS_FILE).is_file()


def frames_settings(frames: str | None) -> dict[str, Any]:
    """The pool-settings entry of a frame refiner (``--frames``): its sha256; nothing without
    one, so pools made without a refiner keep their names and settings."""
    if frames is None:
        return {}
    from ..weights import resolve, sha256

    return {"frames_sha256": sha256(resolve("frames", frames))}


def _frames_net(frames: str | None) -> tuple[Any, float]:
    """The refiner net of a weights file (or None) and the patch window it was trained on."""
    if frames is None:
        return None, DEFAULT_MR_SIZE
    from ..weights import load_net

    loaded = load_net("frames", frames)
    return loaded.net, float(loaded.meta.get("mr_size", DEFAULT_MR_SIZE))


@dataclass(frozen=True)
class _Job:
    chunk: int
    paths: tuple[str, ...]
    indices: tuple[int, ...]
    parts: str
    pairs_per_image: int
    patch_size: int
    mr_size: float
    window_factor: float
    seed: int
    conf: PhotoPairConfig
    threads: int
    frames: str | None = None


def _run_job(job: _Job) -> tuple[int, list[int], list[str], list[str]]:
    """Make the pairs of one chunk of images and write them as ``parts/part_NNNNN``.

    Returns the chunk, pairs per image, pairing mode per image ("" when skipped) and errors.
    """
    if job.threads > 0:
        import cv2
        import torch

        torch.set_num_threads(job.threads)
        cv2.setNumThreads(job.threads)
    arrays, counts, modes, errors = [], [], [], []
    frames, frames_mr = _frames_net(job.frames)
    for path, index in zip(job.paths, job.indices, strict=True):
        try:
            image = load_photo(path, job.conf.max_side)
        except ImageReadError as e:
            log.warning("skipped: %s", e)
            counts.append(0)
            modes.append("")
            errors.append(str(e))
            continue
        rng = np.random.default_rng([job.seed, index])
        res = photo_pairs(
            image,
            rng,
            job.conf,
            job.patch_size,
            job.mr_size,
            job.window_factor,
            job.pairs_per_image,
            frames=frames,
            frames_mr_size=frames_mr,
        )
        arrays.append(res.patches)
        counts.append(len(res))
        modes.append(res.mode)
    p = job.patch_size
    data = np.concatenate(arrays) if arrays else np.zeros((0, 2, p, p), np.uint8)
    write_part(
        Path(job.parts), job.chunk, data, {"counts": counts, "modes": modes, "errors": errors}
    )
    return job.chunk, counts, modes, errors


def _select_images(
    photo_dirs: Sequence[str | Path], max_images: int | None, seed: int
) -> list[tuple[str, str]]:
    """(path, name) of every image of the folders, in order; ``max_images`` keeps an evenly
    random subset (seeded), still in folder order."""
    items: list[tuple[str, str]] = []
    for d in photo_dirs:
        lst = list_images(d)
        items += [(str(lst.path(n)), f"{Path(d).name}/{n}") for n in lst.names]
    if max_images is not None and 0 < max_images < len(items):
        pick = np.sort(
            np.random.default_rng([seed, 7]).choice(len(items), max_images, replace=False)
        )
        items = [items[i] for i in pick]
    return items


def start_pool_build(out: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """Check a pool folder against the settings of a build about to start.

    Returns the settings as they read back from JSON, and the parts folder to build into, or
    None when a finished pool with these settings is already there. A finished or unfinished
    pool with other settings is an OutputError.
    """
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as they read back
    if is_pool(out):
        meta = json.loads((out / META_FILE).read_text())
        if {k: meta.get(k) for k in settings} != settings:
            raise OutputError(
                f"{out}: a pool with other settings is already there; remove it "
                "or choose another folder"
            )
        return settings, None
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    settings_file = parts / "settings.json"
    if settings_file.is_file():
        if json.loads(settings_file.read_text()) != settings:
            raise OutputError(
                f"{out}: holds an unfinished pool with other settings; remove it "
                "or choose another folder"
            )
    else:
        _atomic_write_text(settings_file, json.dumps(settings, indent=1))
    return settings, parts


def build_pool(
    photo_dirs: Sequence[str | Path],
    out: str | Path,
    pairs_per_image: int = 512,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    seed: int = 0,
    workers: int = 1,
    progress: Progress | None = None,
    *,
    window_factor: float = 1.0,
    conf: PhotoPairConfig | None = None,
    max_images: int | None = None,
    chunk_images: int = 16,
    frames: str | None = None,
) -> Path:
    """Pre-generate self-supervised pairs from the photos of ``photo_dirs`` into the pool folder
    ``out`` and return it.

    ``pairs_per_image`` caps the pairs of one photo (many per photo: batches then take many
    points of one photo, see :class:`SameImageSampler`). ``patch_size``, ``mr_size`` and
    ``window_factor`` are those of the net to train (64 and 2 for L2-Net-CS; a 64/2 pool also
    serves the 32-px nets, which take its centre). ``workers`` > 1 makes chunks of
    ``chunk_images`` images in parallel processes. Resumable: run again after an interruption
    and only the missing chunks are made; a finished pool with the same settings is returned
    as it is, one with other settings is an error. ``frames``: cut the patches in the refined
    frames of this frame refiner (weights file or shipped name).
    """
    out = Path(out)
    conf = conf or PhotoPairConfig()
    if pairs_per_image < 1 or patch_size < 8 or chunk_images < 1 or workers < 1:
        raise ConfigError(
            "build_pool: pairs_per_image, chunk_images, workers must be >= 1 and patch_size >= 8"
        )
    items = _select_images(photo_dirs, max_images, seed)
    settings = {
        "format": POOL_FORMAT,
        "version": POOL_VERSION,
        "kind": "photos",
        "sources": [str(Path(d).resolve()) for d in photo_dirs],
        "num_images": len(items),
        "max_images": max_images,
        "pairs_per_image": pairs_per_image,
        "patch_size": patch_size,
        "mr_size": mr_size,
        "window_factor": window_factor,
        "seed": seed,
        "photo_conf": conf.settings(),
        "chunk_images": chunk_images,
        **frames_settings(frames),
    }
    settings, parts = start_pool_build(out, settings)
    if parts is None:
        return out

    t0 = time.perf_counter()
    chunks = [
        list(range(s, min(s + chunk_images, len(items))))
        for s in range(0, len(items), chunk_images)
    ]
    done = {c for c in range(len(chunks)) if part_done(parts, c)}
    threads = 1 if workers > 1 else 0
    jobs = [
        _Job(
            c,
            tuple(items[i][0] for i in idx),
            tuple(idx),
            str(parts),
            pairs_per_image,
            patch_size,
            mr_size,
            window_factor,
            seed,
            conf,
            threads,
            frames,
        )
        for c, idx in enumerate(chunks)
        if c not in done
    ]
    finished = len(done)
    made = 0
    if workers == 1:
        for job in jobs:
            _, counts, _, _ = _run_job(job)
            finished += 1
            made += sum(counts)
            if progress:
                progress(finished, len(chunks), f"{sum(counts)} pairs")
    elif jobs:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
            for _, counts, _, _ in ex.map(_run_job, jobs):
                finished += 1
                made += sum(counts)
                if progress:
                    progress(finished, len(chunks), f"{sum(counts)} pairs")
    gen_seconds = time.perf_counter() - t0

    # Assemble: parts in order into one memory-mappable array.
    infos = read_parts(parts, len(chunks))
    counts_all: list[int] = [n for info in infos for n in info["counts"]]
    modes_all: list[str] = [m for info in infos for m in info["modes"]]
    errors_all: list[str] = [e for info in infos for e in info["errors"]]
    total = int(sum(counts_all))
    if total == 0:
        raise InputError(f"{', '.join(map(str, photo_dirs))}: no pairs could be made")
    assemble_parts(parts, len(chunks), out, total, patch_size)
    offsets = np.concatenate([[0], np.cumsum(counts_all)]).astype(int).tolist()
    meta = {
        **settings,
        "images": [name for _, name in items],
        "offsets": offsets,
        "num_pairs": total,
        "modes": {m: modes_all.count(m) for m in ("detected", "mapped")},
        "skipped": errors_all,
        "seconds": round(gen_seconds, 3),
        "pairs_per_s": round(made / gen_seconds, 1) if gen_seconds > 0 and made else None,
    }
    _atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return out


def assemble_parts(parts: Path, num_parts: int, out: Path, total: int, patch_size: int) -> None:
    """Concatenate ``parts/part_00000.npy`` .. (``num_parts`` of them, ``total`` pairs in all)
    into ``out/pairs.npy``, written under a temporary name and renamed."""
    tmp = out / (PAIRS_FILE + ".tmp.npy")
    arr = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=np.uint8, shape=(total, 2, patch_size, patch_size)
    )
    pos = 0
    for c in range(num_parts):
        part = np.load(parts / f"part_{c:05d}.npy", mmap_mode="r")
        arr[pos : pos + len(part)] = part
        pos += len(part)
    arr.flush()
    del arr
    os.replace(tmp, out / PAIRS_FILE)


# --------------------------------------------------------------------------------------------
# Serving


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
        if pairs.ndim != 4 or pairs.shape[1] != 2 or pairs.shape[2] != pairs.shape[3]:
            raise ValueError(f"pairs must be (K,2,P,P), got {pairs.shape}")
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
        meta = json.loads((path / META_FILE).read_text())
        if meta.get("format") != POOL_FORMAT or meta.get("version") != POOL_VERSION:
            raise InputError(
                f"{path}: pool format {meta.get('format')} v{meta.get('version')}"
                f" is not {POOL_FORMAT} v{POOL_VERSION}"
            )
        pairs = np.load(path / PAIRS_FILE, mmap_mode="r")
        if len(pairs) != meta["num_pairs"]:
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


# --------------------------------------------------------------------------------------------
# Batches


class SameImageSampler:
    """Points of a batch from few groups: ``images_per_batch`` groups, drawn with probability
    proportional to their size (so every point is about equally likely), give
    ``batch_size / images_per_batch`` points each; groups too small to give their share give
    all their points and further groups fill the batch. ``images_per_batch=0``, or a pool
    without groups, draws the points uniformly from the whole pool.

    Stateless: ``points(rng)`` only draws from ``rng``. Shape: -> (batch_size,) point indices,
    all distinct.
    """

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


def _sub_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class MinedSampler:
    """Hard-negative batches of one pool: a :class:`~descmatch.train.samplers.HardNegativeSampler`
    over a random subset of at most ``mine_points`` points (at least ``batch_size``) whose
    descriptors were computed with the current net (:meth:`MixedBatches.mine`); batches are
    groups of ``group_size`` points close in descriptor space (a random seed point and its
    nearest neighbours). A point is described by its first patch; the descriptors are kept as
    float16, as a checkpoint stores them, so a resumed run mines exactly the same batches.

    Shape: ``batch_points(rng, step)`` -> (batch_size,) pool point indices.
    """

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


class MixedBatches:
    """Batches from several pools with mixing weights.

    Batch ``step`` is a pure function of ``(seed, step)`` (and, for ``hard-negative``, of the
    descriptors of the last :meth:`mine`): its pool is drawn with probability proportional to
    the weights and its points by that pool's sampler (``sampler``, one of :data:`SAMPLERS`),
    so a resumed run sees the same batches, and ``rank``/``world_size`` take a slice of each
    batch (rows ``rank::world_size``) for data-parallel training.

    Samplers: ``same-image`` (:class:`SameImageSampler`, ``images_per_batch`` photos per
    batch), ``random`` (:class:`~descmatch.train.samplers.HardNetSampler`), ``progressive``
    (:class:`~descmatch.train.samplers.ProgressiveSampler`, ``p1_fraction`` of a batch walks
    the pool in a shuffled sequence, a new one each pass, the rest is random) and
    ``hard-negative`` (:class:`MinedSampler`, ``mine_points`` and ``mine_group``): its batches
    need :meth:`mine` with the current net whenever :meth:`needs_mining` (every
    ``mine_every`` steps); :meth:`mining_state` / :meth:`load_mining_state` carry what was mined
    through a checkpoint.

    Shape: ``batch(step)`` -> (batch_size,2,P,P) uint8, and the index of the pool used.
    """

    def __init__(
        self,
        pools: Sequence[PairPool],
        weights: Sequence[float],
        batch_size: int,
        images_per_batch: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        sampler: str = "same-image",
        p1_fraction: float = 0.5,
        mine_every: int = 1000,
        mine_points: int = 32768,
        mine_group: int | None = 64,
    ) -> None:
        if not pools or len(pools) != len(weights):
            raise ConfigError("give one weight per data source")
        w = np.asarray(weights, np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"data weights must be >= 0 and not all 0, got {list(weights)}")
        sizes = {p.patch_size for p in pools}
        if len(sizes) != 1:
            raise ConfigError(f"data sources have different patch sizes: {sorted(sizes)}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if not 0.0 < p1_fraction <= 1.0:
            raise ConfigError(f"p1_fraction must be in (0, 1], got {p1_fraction}")
        if mine_every < 1 or mine_points < 2:
            raise ConfigError("mine_every must be >= 1 and mine_points >= 2")
        self.pools = list(pools)
        self.weights = w / w.sum()
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.mine_every = int(mine_every)
        self.mined_round: int | None = None
        self.samplers: list[Any] = []
        for k, p in enumerate(self.pools):
            if sampler == "same-image":
                self.samplers.append(
                    SameImageSampler(p.group_offsets, p.num_points, batch_size, images_per_batch)
                )
                continue
            if not 2 <= batch_size <= p.num_points:
                raise ConfigError(
                    f"batch size {batch_size} must be within 2..{p.num_points} "
                    f"(the number of training points of {p.name})"
                )
            sub = _sub_seed(self.seed, k, 43)
            if sampler == "random":
                self.samplers.append(
                    HardNetSampler(_point_ids(p.num_points), batch_size, 0, seed=sub)
                )
            elif sampler == "progressive":
                self.samplers.append(
                    ProgressiveSampler(
                        _point_ids(p.num_points), batch_size, None, p1_fraction, seed=sub
                    )
                )
            else:
                self.samplers.append(
                    MinedSampler(p.num_points, batch_size, mine_points, mine_group, sub)
                )

    def batch(self, step: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, int(step), 17])
        k = int(rng.choice(len(self.pools), p=self.weights)) if len(self.pools) > 1 else 0
        sampler = self.samplers[k]
        if isinstance(sampler, SameImageSampler):
            pts = sampler.points(rng)
        else:
            if self.needs_mining(step):
                raise RuntimeError(f"batch {step}: mine round {step // self.mine_every} first")
            pts = sampler.batch_points(rng, int(step))
        if self.world_size > 1:
            pts = pts[self.rank :: self.world_size]
        return self.pools[k].gather(pts, rng), k

    # Hard-negative mining.

    @property
    def mines(self) -> bool:
        """Whether the batches need descriptors (the ``hard-negative`` sampler)."""
        return self.sampler == "hard-negative"

    def needs_mining(self, step: int) -> bool:
        """Whether batch ``step`` needs a :meth:`mine` first (a new round of ``mine_every``
        steps)."""
        return self.mines and self.mined_round != int(step) // self.mine_every

    def mine(self, step: int, describe: Callable[[np.ndarray], np.ndarray]) -> None:
        """Describe a new random subset of every pool in use with ``describe`` (the current
        net: (N,P,P) uint8 patches -> (N,D) descriptors) for the round of batch ``step``. The
        subsets and patches are a pure function of ``(seed, round)``."""
        r = int(step) // self.mine_every
        for k, (pool, sampler) in enumerate(zip(self.pools, self.samplers, strict=True)):
            if self.weights[k] <= 0:
                continue
            rng = np.random.default_rng([self.seed, r, k, 37])
            subset = sampler.draw_subset(rng)
            patches = np.ascontiguousarray(pool.gather(subset, rng)[:, 0])
            sampler.set_descriptors(subset, describe(patches))
        self.mined_round = r

    def mining_state(self) -> dict[str, Any] | None:
        """What was mined (the round; per pool its subset and float16 descriptors) as tensors,
        for a checkpoint; None when nothing is mined."""
        if not self.mines or self.mined_round is None:
            return None
        import torch

        pools: list[dict[str, Any] | None] = []
        for s in self.samplers:
            if s.subset is None:
                pools.append(None)
            else:
                pools.append(
                    {
                        "subset": torch.from_numpy(s.subset.copy()),
                        "descriptors": torch.from_numpy(s.descriptors.copy()),
                    }
                )
        return {"round": int(self.mined_round), "mine_every": self.mine_every, "pools": pools}

    def load_mining_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`mining_state` (nothing when it does not fit these settings: the next
        batch then mines again)."""
        if (
            not self.mines
            or not state
            or int(state.get("mine_every", -1)) != self.mine_every
            or len(state.get("pools", [])) != len(self.samplers)
        ):
            return
        for s, st in zip(self.samplers, state["pools"], strict=True):
            if st is not None:
                subset = st["subset"].numpy()
                if len(subset) != s.subset_size or subset.max(initial=0) >= s.num_points:
                    return
        for s, st in zip(self.samplers, state["pools"], strict=True):
            if st is not None:
                s.set_descriptors(st["subset"].numpy(), st["descriptors"].numpy())
        self.mined_round = int(state["round"])


def build_photo_pool_for(
    photo_dir: str | Path,
    cache_root: str | Path,
    patch_size: int,
    mr_size: float,
    window_factor: float,
    pairs_per_image: int,
    seed: int,
    workers: int = 1,
    progress: Progress | None = None,
    conf: PhotoPairConfig | None = None,
    max_images: int | None = None,
    frames: str | None = None,
) -> Path:
    """Build (or reuse) the pool of a photo folder under ``cache_root``, named by the folder and
    a digest of the settings."""
    import hashlib

    conf = conf or PhotoPairConfig()
    key = json.dumps(
        [
            str(Path(photo_dir).resolve()),
            patch_size,
            mr_size,
            window_factor,
            pairs_per_image,
            seed,
            max_images,
            conf.settings(),
            *frames_settings(frames).values(),
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out = Path(cache_root) / f"{Path(photo_dir).resolve().name}-{patch_size}px-{digest}"
    return build_pool(
        [photo_dir],
        out,
        pairs_per_image,
        patch_size,
        mr_size,
        seed,
        workers,
        progress,
        window_factor=window_factor,
        conf=conf,
        max_images=max_images,
        frames=frames,
    )
