"""Distillation pools: the student's patches and the teacher's descriptors of the same
keypoints, computed once.

A distillation pool is a folder:

* ``views.npy`` (M,P,P) uint8 and ``view_offsets.npy`` (T+1,): the observations of point k are
  rows ``view_offsets[k]:view_offsets[k+1]`` (two for a photo pair, a track's views for a
  multi-view point), each cut ONCE in the detector's frame (or, built with a frame refiner,
  in its refined frames) with the student's patch size, ``mr_size`` and window factor; a
  multi-view pool keeps these in its source pool (named in the meta) and holds only the
  teacher's descriptors;
* ``teacher.npy`` (M,D) float16: the teacher pipeline's descriptor of every observation, as
  the teacher describes that keypoint at inference (its own frame refiner, size pooling and
  patch cuts, on the same image), so training runs the student alone;
* ``meta.json``: format, kind, the teacher's settings, the group offsets (the points of one
  photo or anchor image, hard negatives for each other), build settings.

Photo sources are the self-supervised homography pairs of :func:`~.photos.photo_pairs`
(each photo's pairs drawn as the photo pools draw them); multi-view sources are real 3D tracks
(:func:`~.multiview.build_multiview_pool_for`), described on the images the tracks were found
in. Built chunk by chunk, resumably (parts written atomically; ``meta.json`` last).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_save_npy, atomic_savez, atomic_write_text
from ..detect import Keypoints
from ..errors import ConfigError, ImageReadError, InputError, OutputError
from ..images import read_image, resize_max
from ..nets.frames import refine_frames
from ..patches import (
    DEFAULT_MR_SIZE,
    WindowFactor,
    build_pyramid,
    extract_patches,
    patches_to_uint8,
    view_shape,
)
from .photos import (
    PhotoPairConfig,
    load_photo,
    photo_pairs,
    photometric,
    random_homography,
    warp_image,
)
from .pool import VIEW_OFFSETS_FILE, VIEWS_FILE, read_meta
from .poolbuild import _frames_net, _select_images, frames_settings, start_pool_build
from .teacherpool import DISTILL_FORMAT, TEACHER_FILE

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
#: Called on (image (H,W) float32, xy (N,2), size (N,), angle (N,)) -> (N,D) float32.
TeacherFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Teacher:
    """The teacher pipeline: a describer (net, frame refiner, size pooling) run in fp32 on
    keypoints given by their frames; ``settings`` name it (weights and refiner sha256, size
    pooling, window) for pool names and the run's meta."""

    def __init__(self, describer: Any, settings: dict[str, Any]) -> None:
        self.describer, self.settings = describer, settings
        self.dim = int(describer.dim)

    def __call__(
        self, image: np.ndarray, xy: np.ndarray, size: np.ndarray, angle: np.ndarray
    ) -> np.ndarray:
        """Shape: image (H,W) float32, xy (N,2), size, angle (N,) -> (N,D) float32."""
        n = len(xy)
        kps = Keypoints(
            np.asarray(xy, np.float32),
            np.asarray(size, np.float32),
            np.asarray(angle, np.float32),
            np.zeros(n, np.float32),
        )
        with torch.inference_mode():
            return np.asarray(self.describer(np.ascontiguousarray(image, np.float32), kps))


def load_teacher(spec: str) -> Teacher:
    """``auto``: the shipped default pipeline (weights/DEFAULT's net with the shipped frame
    refiner and size pooling); else a learned method name with shipped weights, described the
    same way."""
    from ..describe import CLASSICAL, build_describer, resolve_method

    method = resolve_method(spec)
    if method in CLASSICAL:
        raise ConfigError(f"--teacher {spec}: the teacher must be a learned net, not {method}")
    d = build_describer(method, precision="fp32", frames="auto", size_pool="auto")
    meta = dict(d.meta)
    settings = {
        "method": method,
        "weights_sha256": meta.get("weights_sha256"),
        "frames_sha256": meta.get("frames_sha256"),
        "size_pool": meta.get("size_pool", [1.0]),
        "mr_size": float(getattr(d, "mr_size", 0.0)),
        "dim": int(d.dim),
    }
    return Teacher(d, settings)


def _start(out: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """:func:`~.poolbuild.start_pool_build` for a distillation pool (finished once its
    ``meta.json`` and ``teacher.npy`` are in place)."""
    if (out / "meta.json").is_file() and (out / TEACHER_FILE).is_file():
        settings = json.loads(json.dumps(settings))
        meta = read_meta(out)
        if {k: meta.get(k) for k in settings} != settings:
            raise OutputError(
                f"{out}: a pool with other settings is already there; remove it "
                "or choose another folder"
            )
        return settings, None
    return start_pool_build(out, settings)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def _photo_images(
    image: np.ndarray, rng: np.random.Generator, conf: PhotoPairConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two images :func:`photo_pairs` makes from ``rng`` in this state (it draws the
    homography and then the two photometric changes first). Shape: -> src, dst (H,W); H."""
    h = random_homography(image.shape[1], image.shape[0], rng, conf)
    warped = warp_image(image, h)
    src = photometric(image, rng, conf) if conf.photometric_source else image
    return src, photometric(warped, rng, conf), h


def photo_distill_pairs(
    image: np.ndarray,
    rng: np.random.Generator,
    teacher: TeacherFn,
    conf: PhotoPairConfig,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
    max_pairs: int,
    frames: Any = None,
    frames_mr_size: float = DEFAULT_MR_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """One photo's pairs: the student's patches in the detector's frames (in the refined
    frames of a ``frames`` net when one is given) and the teacher's descriptors of both
    keypoints on the two images, from the detector's frames as the teacher describes them at
    inference. Shape: -> (2K,P,P) uint8 ((2K,V,P,P) for V window factors; pair k is rows 2k,
    2k+1), (2K,D) float32."""
    image = np.ascontiguousarray(image, np.float32)
    src, dst, h = _photo_images(image, copy.deepcopy(rng), conf)
    res = photo_pairs(image, rng, conf, patch_size, mr_size, window_factor, max_pairs)
    if not np.allclose(res.H, h):
        raise RuntimeError("photo pairs: the second view could not be reproduced")
    k = len(res)
    views = res.patches.reshape(2 * k, *view_shape(patch_size, window_factor))
    if k == 0:
        return views, np.zeros((0, 0), np.float32)
    if frames is not None:
        cut = [
            refined_views(frames, frames_mr_size, im, xy, size, angle, patch_size, mr_size,
                          window_factor)
            for im, xy, size, angle in (
                (src, res.src_xy, res.src_size, res.src_angle),
                (dst, res.dst_xy, res.dst_size, res.dst_angle),
            )
        ]  # fmt: skip
        views = np.stack(cut, 1).reshape(2 * k, *view_shape(patch_size, window_factor))
    ta = teacher(src, res.src_xy, res.src_size, res.src_angle)
    tb = teacher(dst, res.dst_xy, res.dst_size, res.dst_angle)
    return views, np.stack([ta, tb], 1).reshape(2 * k, -1)


def refined_views(
    frames: Any,
    frames_mr_size: float,
    image: np.ndarray,
    xy: np.ndarray,
    size: np.ndarray,
    angle: np.ndarray,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
) -> np.ndarray:
    """Patches cut in the refined frames of the ``frames`` net, as a describer that uses it
    cuts them. Shape: image (H,W) float32, xy (N,2), size, angle (N,) -> (N,P,P) uint8
    ((N,V,P,P) for V window factors)."""
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(image, np.float32))
        pyr = build_pyramid(t)
        size, angle = refine_frames(frames, t, xy, size, angle, frames_mr_size, pyramid=pyr)
        p = extract_patches(
            t, xy, size, angle, patch_size=patch_size, mr_size=mr_size,
            window_factor=window_factor, pyramid=pyr,
        )  # fmt: skip
        return patches_to_uint8(p)


def build_photo_distill_pool(
    photo_dir: str | Path,
    cache_root: str | Path,
    teacher: Teacher,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
    pairs_per_image: int,
    seed: int,
    conf: PhotoPairConfig,
    max_images: int | None = None,
    progress: Progress | None = None,
    chunk_images: int = 16,
    frames: str | None = None,
) -> Path:
    """Build (or reuse) the distillation pool of a photo folder under ``cache_root``; with
    ``frames`` (a frame refiner's file or shipped name) the student's patches are cut in its
    refined frames."""
    items = _select_images([photo_dir], max_images, seed)
    settings = {
        "format": DISTILL_FORMAT,
        "kind": "photos",
        "source": str(Path(photo_dir).resolve()),
        "num_images": len(items),
        "max_images": max_images,
        "pairs_per_image": pairs_per_image,
        "patch_size": patch_size,
        "mr_size": mr_size,
        "window_factor": window_factor,
        "seed": seed,
        "photo_conf": conf.settings(),
        "teacher": teacher.settings,
        "chunk_images": chunk_images,
        **frames_settings(frames),
    }
    out = Path(cache_root) / f"distill-{Path(photo_dir).resolve().name}-{_key(settings)}"
    settings, parts = _start(out, settings)
    if parts is None:
        return out
    refiner, refiner_mr = _frames_net(frames)
    chunks = [
        range(s, min(s + chunk_images, len(items))) for s in range(0, len(items), chunk_images)
    ]
    for c, idx in enumerate(chunks):
        if (parts / f"part_{c:05d}.json").is_file():
            continue
        views, feats, counts = [], [], []
        for i in idx:
            try:
                image = load_photo(items[i][0], conf.max_side)
            except ImageReadError as e:
                log.warning("skipped: %s", e)
                counts.append(0)
                continue
            v, t = photo_distill_pairs(
                image,
                np.random.default_rng([seed, i]),
                teacher,
                conf,
                patch_size,
                mr_size,
                window_factor,
                pairs_per_image,
                refiner,
                refiner_mr,
            )
            views.append(v)
            feats.append(t.reshape(len(v), teacher.dim))
            counts.append(len(v) // 2)
        atomic_savez(
            parts / f"part_{c:05d}.npz",
            views=np.concatenate(views)
            if views
            else np.zeros((0, *view_shape(patch_size, window_factor))),
            teacher=(np.concatenate(feats) if feats else np.zeros((0, teacher.dim))).astype(
                np.float16
            ),
        )
        atomic_write_text(parts / f"part_{c:05d}.json", json.dumps({"counts": counts}))
        if progress:
            progress(c + 1, len(chunks), f"{sum(counts)} pairs")
    counts_all = [n for c in range(len(chunks)) for n in _part_info(parts, c)["counts"]]
    if sum(counts_all) == 0:
        raise InputError(f"{photo_dir}: no pairs could be made")
    datas = [np.load(parts / f"part_{c:05d}.npz") for c in range(len(chunks))]
    atomic_save_npy(out / VIEWS_FILE, np.concatenate([d["views"] for d in datas]).astype(np.uint8))
    atomic_save_npy(out / TEACHER_FILE, np.concatenate([d["teacher"] for d in datas]))
    atomic_save_npy(out / VIEW_OFFSETS_FILE, np.arange(0, 2 * sum(counts_all) + 1, 2))
    groups = np.concatenate([[0], np.cumsum(counts_all)]).astype(int).tolist()
    meta = {**settings, "images": [n for _, n in items], "offsets": groups}
    atomic_write_text(out / "meta.json", json.dumps({**meta, "num_points": sum(counts_all)}))
    shutil.rmtree(parts, ignore_errors=True)
    return out


def _part_info(parts: Path, c: int) -> dict[str, Any]:
    return dict(json.loads((parts / f"part_{c:05d}.json").read_text()))


def build_multiview_distill_pool(
    scenes: str | Path,
    cache_root: str | Path,
    teacher: Teacher,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
    seed: int,
    max_points_per_image: int | None = 2000,
    progress: Progress | None = None,
    frames: str | None = None,
) -> Path:
    """Build (or reuse) the distillation pool of multi-view scenes under ``cache_root``: the
    multi-view pool of the tracks (built there too; its patches in the refined frames of
    ``frames`` when given) and the teacher's descriptors of every view, described on the
    scene's images at the tracks' keypoints (the detector's frames)."""
    from .multiview import build_multiview_pool

    key = [str(Path(scenes).resolve()), patch_size, mr_size, window_factor, seed]
    key += list(frames_settings(frames).values())
    base = Path(cache_root) / f"multiview-{Path(scenes).resolve().name}-{_key(*key)}"
    base = build_multiview_pool(
        scenes,
        base,
        patch_size,
        mr_size,
        window_factor,
        seed=seed,
        max_points_per_image=max_points_per_image,
        progress=progress,
        frames=frames,
    )
    bmeta = read_meta(base)
    settings = {
        "format": DISTILL_FORMAT,
        "kind": "multiview",
        "base": str(base.resolve()),
        "patch_size": patch_size,
        "mr_size": mr_size,
        "window_factor": window_factor,
        "teacher": teacher.settings,
        **frames_settings(frames),
    }
    out = Path(cache_root) / f"distill-{base.name}-{_key(settings)}"
    settings, parts = _start(out, settings)
    if parts is None:
        return out
    tracks = np.load(base / "tracks.npz")
    obs_image, xy = tracks["obs_image"], tracks["obs_xy"]
    size, angle = tracks["obs_size"], tracks["obs_angle"]
    names: list[str] = bmeta["images"]
    dirs = {Path(s).name: Path(s) for s in bmeta["sources"]}
    feats = np.zeros((len(obs_image), teacher.dim), np.float16)
    for g, name in enumerate(names):
        sel = np.flatnonzero(obs_image == g)
        if len(sel) == 0:
            continue
        scene, file = name.split("/", 1)
        image = resize_max(read_image(dirs[scene] / "images" / file), bmeta["max_side"])[0]
        feats[sel] = teacher(image, xy[sel], size[sel], angle[sel]).astype(np.float16)
        if progress:
            progress(g + 1, len(names), f"teacher: {name}")
    atomic_save_npy(out / TEACHER_FILE, feats)
    atomic_write_text(out / "meta.json", json.dumps({**settings, "offsets": bmeta["offsets"]}))
    shutil.rmtree(parts, ignore_errors=True)
    return out
