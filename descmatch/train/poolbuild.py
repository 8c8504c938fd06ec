"""Building pair pools from folders of photos (see :mod:`.photos` for how a pair is made).

:func:`build_pool` makes one resumably: images are done in chunks, each chunk written to
``parts/`` atomically (temporary name + rename), and finished chunks are skipped when the
build runs again; the final ``pairs.npy`` and ``meta.json`` are also written under temporary
names and renamed. Each image draws from its own random stream ``default_rng([seed, image
index])``, so the pool does not depend on chunking, workers or interruptions. The part-file
helpers (:func:`start_pool_build`, :func:`write_part`, :func:`assemble_parts`) serve the
HPatches and multi-view builders too.
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

from ..atomic import atomic_save_npy, atomic_write_text, temporary_path
from ..errors import ConfigError, ImageReadError, InputError, OutputError
from ..images import list_images
from ..patches import DEFAULT_MR_SIZE
from .photos import PhotoPairConfig, load_photo, photo_pairs
from .pool import META_FILE, PAIRS_FILE, PARTS_DIR, POOL_FORMAT, POOL_VERSION, is_pool, read_meta

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def part_done(parts: Path, chunk: int) -> bool:
    """Whether part ``chunk`` of a pool build is complete (its info file is written last)."""
    return (parts / f"part_{chunk:05d}.json").is_file()


def write_part(parts: Path, chunk: int, data: np.ndarray, info: dict[str, Any]) -> None:
    """One finished chunk of a pool build: its pairs, then its info (crash-safe: a part
    counts as done only once both are in place)."""
    atomic_save_npy(parts / f"part_{chunk:05d}.npy", data)
    atomic_write_text(parts / f"part_{chunk:05d}.json", json.dumps(info))


def read_parts(parts: Path, num_parts: int) -> list[dict[str, Any]]:
    """The info of parts 0 .. ``num_parts`` - 1, in order."""
    return [json.loads((parts / f"part_{c:05d}.json").read_text()) for c in range(num_parts)]


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
        meta = read_meta(out)
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
        atomic_write_text(settings_file, json.dumps(settings, indent=1))
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
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return out


def assemble_parts(parts: Path, num_parts: int, out: Path, total: int, patch_size: int) -> None:
    """Concatenate ``parts/part_00000.npy`` .. (``num_parts`` of them, ``total`` pairs in all)
    into ``out/pairs.npy``, written under a temporary name and renamed."""
    tmp = temporary_path(out / PAIRS_FILE)
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
