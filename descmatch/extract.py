"""The extract and detect stages: images -> features.h5 (resumable, crash-safe).

Image decoding and detection run in a worker thread ahead of description, so the net is
not kept waiting on I/O (OpenCV and torch release the GIL).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .describe import Describer, NetDescriber
from .detect import Detector, Keypoints
from .distributed import Dist, session
from .errors import ImageReadError
from .h5 import Shard, Writer, settings_json
from .images import ImageList
from .outputs import refuse_inputs

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


@dataclass
class ExtractResult:
    path: Path
    images: int = 0
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    keypoints: int = 0
    seconds: float = 0.0
    describe_seconds: float = 0.0  # net (or SIFT descriptor) time in the main thread
    load_seconds: float = 0.0  # decode + resize + detect, in the prefetch thread
    write_seconds: float = 0.0  # HDF5 writes

    @property
    def keypoints_per_image(self) -> float:
        return self.keypoints / self.images if self.images else 0.0

    @property
    def patches_per_second(self) -> float:
        return self.keypoints / self.describe_seconds if self.describe_seconds > 0 else 0.0


@dataclass
class _Loaded:
    name: str
    image: np.ndarray | None = None  # resized, as described
    kps: Keypoints | None = None  # in resized coordinates
    scale: tuple[float, float] = (1.0, 1.0)
    size: tuple[int, int] = (0, 0)  # original (width, height)
    error: str | None = None
    seconds: float = 0.0  # spent loading and detecting (in the prefetch thread)


def _load(images: ImageList, name: str, detector: Detector, max_side: int | None) -> _Loaded:
    t0 = time.perf_counter()
    try:
        img = images.read(name, max_side)  # judged by content, downscaled above max_pixels
    except ImageReadError as e:
        return _Loaded(name, error=str(e), seconds=time.perf_counter() - t0)
    kps = detector(img.image)
    return _Loaded(name, img.image, kps, img.scale, img.size, seconds=time.perf_counter() - t0)


def _prefetch(
    images: ImageList,
    names: list[str],
    detector: Detector,
    max_side: int | None,
    depth: int = 2,
) -> Iterator[_Loaded]:
    """Load and detect up to ``depth`` images ahead in a worker thread (0: in this thread)."""
    if depth <= 0:
        for name in names:
            yield _load(images, name, detector, max_side)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="descmatch-load") as pool:
        queue: list[Future[_Loaded]] = []
        it = iter(names)
        for name in it:
            queue.append(pool.submit(_load, images, name, detector, max_side))
            if len(queue) > depth:
                yield queue.pop(0).result()
        for fut in queue:
            yield fut.result()


def extract(
    images: ImageList,
    out: str | Path,
    describer: Describer | None,
    detector: Detector,
    max_side: int | None = None,
    overwrite: bool = False,
    strict: bool = False,
    half: bool = False,
    extra_settings: dict[str, Any] | None = None,
    progress: Progress | None = None,
    prefetch: int = 2,
    wait: bool = False,
) -> ExtractResult:
    """Detect (and describe unless ``describer`` is None) every image into ``out``.

    Images already in ``out`` are skipped unless ``overwrite``. Unreadable images are
    skipped and listed in the result; ``strict`` makes them fatal. Under ``torchrun`` with
    several processes each takes every N-th image still to do and writes its own part file;
    rank 0 merges them into ``out`` at the end, and every rank returns the run's totals.
    ``prefetch`` images are read and detected ahead in a worker thread while the current one
    is described (0: one after the other, for measuring the overlap).
    An output that is one of the images is refused before any work (OutputError); while
    it writes, ``out`` is locked (``wait``: wait for another writer to finish).
    """
    out = Path(out)
    _refuse_image_as_output(images, out)
    t0 = time.perf_counter()
    settings = {**detector.settings(), "resize_max": max_side, **(extra_settings or {})}
    if describer is not None and hasattr(describer, "mr_size"):
        settings["mr_size"] = describer.mr_size
    if describer is not None and describer.meta.get("frames_sha256"):
        settings["frames_sha256"] = describer.meta["frames_sha256"]
    if describer is not None and describer.meta.get("size_pool"):
        settings["size_pool"] = describer.meta["size_pool"]
    for key in ("int8", "frames_int8"):  # int8 models give other descriptors: never mixed
        if describer is not None and describer.meta.get(key):
            settings[key] = describer.meta[key]
    attrs = {
        "method": describer.name if describer else "none",
        "descriptor_dim": describer.dim if describer else 0,
        "weights": describer.meta.get("weights", "") if describer else "",
        "weights_sha256": describer.meta.get("weights_sha256", "") if describer else "",
        "settings": settings_json(settings),
    }
    result = ExtractResult(out)
    with session(getattr(describer, "device", None)) as d:
        _extract(
            images,
            out,
            describer,
            detector,
            max_side,
            overwrite,
            strict,
            half,
            attrs,
            progress,
            result,
            d,
            prefetch,
            wait,
        )
        result.seconds = time.perf_counter() - t0
        if d.active:
            result = _combine(result, d.gather(result))
    return result


def _refuse_image_as_output(images: ImageList, out: Path) -> None:
    """OutputError when ``out`` is one of the images (compared by the file it resolves to,
    among the images of the same file name: no stat of every image)."""
    base = Path(os.path.realpath(out)).name
    same = [images.path(n) for n in images.names if Path(n).name in (base, out.name)]
    refuse_inputs(out, same, "features file")


def _combine(mine: ExtractResult, parts: list[ExtractResult]) -> ExtractResult:
    """The whole run's figures from every rank's (describe time: the slowest rank's)."""
    return ExtractResult(
        mine.path,
        images=sum(p.images for p in parts),
        skipped_existing=mine.skipped_existing,
        failed=[f for p in parts for f in p.failed],
        keypoints=sum(p.keypoints for p in parts),
        seconds=mine.seconds,
        describe_seconds=max(p.describe_seconds for p in parts),
        load_seconds=max(p.load_seconds for p in parts),
        write_seconds=max(p.write_seconds for p in parts),
    )


def _extract(
    images: ImageList,
    out: Path,
    describer: Describer | None,
    detector: Detector,
    max_side: int | None,
    overwrite: bool,
    strict: bool,
    half: bool,
    attrs: dict[str, Any],
    progress: Progress | None,
    result: ExtractResult,
    d: Dist,
    prefetch: int,
    wait: bool,
) -> None:
    with Writer(
        out,
        "features",
        attrs,
        overwrite=overwrite,
        must_match=("method", "descriptor_dim", "weights_sha256", "settings"),
        shard=Shard(d.rank, d.world_size, d.barrier),
        wait=wait,
    ) as writer:
        pending = [n for n in images.names if n not in writer.done]
        result.skipped_existing = len(images.names) - len(pending)
        todo = d.shard(pending)
        if d.active:
            log.info(
                "rank %d of %d: %d of %d images", d.rank, d.world_size, len(todo), len(pending)
            )
        pack = int(getattr(describer, "pack_patches", 0) or 0)
        held: list[_Loaded] = []  # loaded images waiting for one net call (pack > 0)
        held_kps = done = 0

        def finish(batch: list[_Loaded]) -> None:
            nonlocal done
            descs: list[np.ndarray | None] = [None] * len(batch)
            if describer is not None:
                td = time.perf_counter()
                loaded = [
                    (b.image, b.kps) for b in batch if b.image is not None and b.kps is not None
                ]
                if len(loaded) != len(batch):
                    raise AssertionError("finish() takes loaded images only")
                if isinstance(describer, NetDescriber):
                    # the refined frames are the ones written
                    loaded = [(im, describer.refine(im, k)) for im, k in loaded]
                    for b, (_, k) in zip(batch, loaded, strict=True):
                        b.kps = k
                    if len(loaded) > 1:
                        descs = list(describer.describe_many(loaded))
                    else:
                        descs = [describer.describe(*loaded[0])]
                else:
                    descs = [describer(im, k) for im, k in loaded]
                result.describe_seconds += time.perf_counter() - td
            for item, desc in zip(batch, descs, strict=True):
                _write(writer, item, desc, half, result)
                done += 1
                if progress:
                    progress(done, len(todo), item.name)

        for item in _prefetch(images, todo, detector, max_side, prefetch):
            result.load_seconds += item.seconds
            if item.error is not None:
                if strict:
                    raise ImageReadError(item.error)
                log.warning("skipped: %s", item.error)
                result.failed.append((item.name, item.error))
                done += 1
                if progress:
                    progress(done, len(todo), item.name)
                continue
            held.append(item)
            held_kps += len(item.kps)  # type: ignore[arg-type]
            if held_kps >= pack:
                finish(held)
                held, held_kps = [], 0
        if held:
            finish(held)


def _write(
    writer: Writer, item: _Loaded, desc: np.ndarray | None, half: bool, result: ExtractResult
) -> None:
    """One image's keypoints (in original pixels) and descriptors into the features file."""
    assert item.kps is not None
    kps = item.kps
    data: dict[str, np.ndarray] = {}
    if desc is not None:
        desc_t = desc.T.astype(np.float16 if half else np.float32)
        data["descriptors"] = np.ascontiguousarray(desc_t)
    sx, sy = item.scale
    full = kps.scaled(1.0 / sx, 1.0 / sy) if (sx, sy) != (1.0, 1.0) else kps
    data.update(
        {
            "keypoints": full.xy.astype(np.float32),
            "scores": full.response.astype(np.float32),
            "scales": full.size.astype(np.float32),
            "oris": full.angle.astype(np.float32),
            "image_size": np.array(item.size, np.int32),
        }
    )
    tw = time.perf_counter()
    writer.write(item.name, data)
    result.write_seconds += time.perf_counter() - tw
    result.images += 1
    result.keypoints += len(kps)
