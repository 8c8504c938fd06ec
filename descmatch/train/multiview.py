"""Training patches from real multi-view scenes with known cameras: patches of one 3D point seen
in several views, the way the Brown/PhotoTour patches were made. The tracks come from
:func:`~descmatch.train.tracks.scene_tracks` (detect, match, epipolar check, tracks,
triangulation).

Each kept track is one point; its observations are patches cut at the DETECTED keypoints
(position, size, orientation: the detector's own noise, as in Brown) with
:func:`~descmatch.patches.extract_patches`, one batched call per image.

The pool (:func:`build_multiview_pool`) is a pair pool folder that :class:`~.pool.PairPool`
loads (``pairs.npy`` + ``meta.json``) plus every observation:

* every point belongs to exactly one group, an image of the track drawn at random (its
  "anchor" view); groups are the images, so :class:`~.pool.SameImageSampler` composes batches
  from few images and the anchors of a batch are many points of one photo (hard negatives).
  A point never appears twice in the pool, so a batch never holds two pairs of one 3D point
  (which would be false negatives);
* ``pairs.npy`` (T,2,P,P): the anchor patch and one other view drawn once (a plain pool:
  ``pool:PATH`` serves these fixed pairs);
* ``views.npy`` (M,P,P) and ``view_offsets.npy`` (T+1,): all observations of point k are rows
  ``view_offsets[k]:view_offsets[k+1]``, its anchor first. :class:`MultiviewPairPool` (used by
  the training loop's ``multiview:`` data kind) serves the anchor with a view of the track drawn
  at random at each gather, so a track of L views gives L-1 different pairs over training;
* ``tracks.npz``: per observation its image, keypoint and reprojection error, per point its 3D
  position and scene (for inspection).

Built scene by scene, resumably (each finished scene is a part file written atomically under
``parts/``; the final files are written under temporary names and renamed, ``meta.json``
last). Randomness (anchors, the fixed pairs, the per-image cap) comes from
``default_rng([seed, scene index, ...])``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import (
    atomic_save_npy,
    atomic_savez,
    atomic_write,
    atomic_write_text,
    temporary_path,
)
from ..errors import ConfigError, InputError
from ..nets.frames import refine_frames
from ..patches import (
    DEFAULT_MR_SIZE,
    WindowFactor,
    build_pyramid,
    extract_patches,
    patches_to_uint8,
    view_shape,
    window_span,
)
from .pool import (
    META_FILE,
    PAIRS_FILE,
    POOL_FORMAT,
    POOL_VERSION,
    TRACKS_FILE,
    VIEW_OFFSETS_FILE,
    VIEWS_FILE,
    MultiviewPairPool,
)
from .poolbuild import _frames_net, frames_settings, start_pool_build
from .tracks import (
    Camera,
    SceneTracks,
    TrackConfig,
    connected_components,
    epipolar_distance,
    find_scenes,
    fundamental_matrix,
    read_cameras,
    scene_tracks,
    triangulate,
    view_pairs,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


# --------------------------------------------------------------------------------------------
# Patches and the pool


def _scene_points(
    tr: SceneTracks, rng: np.random.Generator, max_points_per_image: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchor images and observation order of the scene's points.

    Each track gets one anchor view drawn at random; at most ``max_points_per_image`` points
    per anchor image are kept (drawn at random). Points are ordered by anchor image, then
    track. Returns the kept tracks (T',), their anchor images (T',) and the observation rows
    (M',), each point's rows with its anchor first and then the other views in image order.
    """
    n = tr.num_tracks
    lengths = np.diff(tr.offsets)
    anchor_pos = (rng.random(n) * lengths).astype(np.int64) if n else np.zeros(0, np.int64)
    anchor_img = tr.obs_image[tr.offsets[:-1] + anchor_pos] if n else np.zeros(0, np.int64)
    keys = rng.random(n)
    order = np.lexsort((keys, anchor_img))  # by image, random within
    img_sorted = anchor_img[order]
    grp_first = np.searchsorted(img_sorted, img_sorted, side="left")
    rank = np.arange(n) - grp_first
    if max_points_per_image is not None and max_points_per_image > 0:
        order = order[rank < max_points_per_image]
    tracks = order[np.lexsort((order, anchor_img[order]))]
    rows = []
    for k in tracks:
        s, e = tr.offsets[k], tr.offsets[k + 1]
        a = s + anchor_pos[k]
        rows.append(np.r_[a, np.arange(s, a), np.arange(a + 1, e)])
    obs = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return tracks.astype(np.int64), anchor_img[tracks].astype(np.int64), obs


def cut_patches(
    tr: SceneTracks,
    rows: np.ndarray,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
    frames: Any = None,
    frames_mr_size: float = DEFAULT_MR_SIZE,
) -> np.ndarray:
    """Patches of observations ``rows`` of a scene, cut at the detected keypoints (in the
    refined frames of a ``frames`` net when one is given), one
    :func:`~descmatch.patches.extract_patches` call per image. Shape: -> (len(rows),P,P) uint8,
    (len(rows),V,P,P) for V window factors."""
    out = np.zeros((len(rows), *view_shape(patch_size, window_factor)), np.uint8)
    img_of = tr.obs_image[rows]
    with torch.inference_mode():
        for g in np.unique(img_of):
            sel = np.flatnonzero(img_of == g)
            r = rows[sel]
            t = torch.from_numpy(np.ascontiguousarray(tr.images[g]))
            size, angle = tr.obs_size[r], tr.obs_angle[r]
            if frames is not None:
                size, angle = refine_frames(frames, t, tr.obs_xy[r], size, angle, frames_mr_size)
            p = extract_patches(
                t,
                tr.obs_xy[r],
                size,
                angle,
                patch_size=patch_size,
                mr_size=mr_size,
                window_factor=window_factor,
                pyramid=build_pyramid(t),
            )
            out[sel] = patches_to_uint8(p)
    return out


def _make_scene_part(
    scene: Path,
    index: int,
    parts: Path,
    conf: TrackConfig,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
    max_points_per_image: int | None,
    seed: int,
    progress: Progress | None,
    frames: Any = None,
) -> dict[str, Any]:
    tr = scene_tracks(scene, conf, progress)
    rng = np.random.default_rng([seed, index])
    tracks, anchor_img, rows = _scene_points(tr, rng, max_points_per_image)
    lengths = np.diff(tr.offsets)[tracks]
    view_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    views = cut_patches(tr, rows, patch_size, mr_size, window_factor, *_frames_net(frames))
    # The fixed pair of each point: its anchor and one other view drawn at random.
    second = 1 + (rng.random(len(tracks)) * (lengths - 1)).astype(np.int64)
    counts = np.bincount(anchor_img, minlength=len(tr.names)).astype(np.int64)
    atomic_savez(
        parts / f"scene_{index:03d}.npz",
        views=views,
        view_offsets=view_offsets,
        second=second,
        group_counts=counts,
        obs_image=tr.obs_image[rows],
        obs_xy=tr.obs_xy[rows],
        obs_size=tr.obs_size[rows],
        obs_angle=tr.obs_angle[rows],
        obs_err=tr.obs_err[rows],
        xyz=tr.xyz[tracks],
        scales=np.asarray(tr.scales, np.float64).reshape(-1, 2),
    )
    stats = {
        **tr.stats,
        "points": int(len(tracks)),
        "views": int(len(rows)),
        "patch_agreement": _agreement(views, view_offsets, second),
    }
    info = {"names": tr.names, "stats": stats}
    atomic_write_text(parts / f"scene_{index:03d}.json", json.dumps(info))
    return info


def _agreement(
    views: np.ndarray, view_offsets: np.ndarray, second: np.ndarray, n: int = 2000
) -> dict[str, float] | None:
    """Mean absolute difference (gray levels) of the fixed pairs of up to ``n`` points and of
    the same patches paired with another point's: a quick check that the pairs show the same
    thing."""
    t = len(view_offsets) - 1
    if t < 2:
        return None
    k = np.linspace(0, t - 1, min(n, t)).astype(np.int64)
    a = views[view_offsets[k]].astype(np.float32)
    b = views[view_offsets[k] + second[k]].astype(np.float32)
    return {
        "pairs": round(float(np.abs(a - b).mean()), 2),
        "shuffled": round(float(np.abs(a - np.roll(b, 1, 0)).mean()), 2),
    }


def build_multiview_pool(
    scene_dirs: str | Path | Sequence[str | Path],
    out: str | Path,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: WindowFactor = 1.0,
    max_keypoints: int = 4000,
    max_side: int | None = 1024,
    pair_window: int = 5,
    epipolar_px: float = 2.0,
    reproj_px: float = 2.0,
    min_track: int = 2,
    max_points_per_image: int | None = 2000,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    ratio: float = 0.8,
    max_view_angle: float = 60.0,
    frames: str | None = None,
) -> Path:
    """Build the multi-view pool of ``scene_dirs`` (scene folders, or folders of scene
    folders) into the folder ``out`` and return it (see the module docstring).

    ``patch_size``, ``mr_size`` and ``window_factor`` are those of the net to train (a 64-px,
    window factor 2 pool also serves the 32-px nets). ``max_points_per_image`` caps the points
    anchored in one image. Resumable: run again after an interruption and only the missing
    scenes are made; a finished pool with the same settings is returned as it is, one with
    other settings is an error. ``progress(i, n, text)`` reports images and view pairs.
    """
    out = Path(out)
    if isinstance(scene_dirs, (str, Path)):
        scene_dirs = [scene_dirs]
    if patch_size < 8:
        raise ConfigError("build_multiview_pool: patch_size must be >= 8")
    scenes = [s for d in scene_dirs for s in find_scenes(d)]
    conf = TrackConfig(
        max_keypoints=max_keypoints,
        max_side=max_side,
        pair_window=pair_window,
        max_view_angle=max_view_angle,
        ratio=ratio,
        epipolar_px=epipolar_px,
        reproj_px=reproj_px,
        min_track=min_track,
        window=mr_size * window_span(window_factor),
    )
    settings = {
        "format": POOL_FORMAT,
        "version": POOL_VERSION,
        "kind": "multiview",
        "sources": [str(s.resolve()) for s in scenes],
        "patch_size": patch_size,
        "mr_size": mr_size,
        "window_factor": window_factor,
        "max_keypoints": max_keypoints,
        "max_side": max_side,
        "pair_window": pair_window,
        "max_view_angle": max_view_angle,
        "ratio": ratio,
        "epipolar_px": epipolar_px,
        "reproj_px": reproj_px,
        "min_track": min_track,
        "max_points_per_image": max_points_per_image,
        "seed": seed,
        **frames_settings(frames),
    }
    settings, parts = start_pool_build(out, settings)
    if parts is None:
        return out

    t0 = time.perf_counter()
    infos: list[dict[str, Any]] = []
    for si, scene in enumerate(scenes):
        done = parts / f"scene_{si:03d}.json"
        if done.is_file() and (parts / f"scene_{si:03d}.npz").is_file():
            infos.append(json.loads(done.read_text()))
            continue
        info = _make_scene_part(
            scene,
            si,
            parts,
            conf,
            patch_size,
            mr_size,
            window_factor,
            max_points_per_image,
            seed,
            progress,
            frames,
        )
        st = info["stats"]
        log.info(
            "%s: %d images, %d tracks, mean length %.2f, %d observations, reprojection %.3f px",
            st["scene"],
            st["images"],
            st["tracks"],
            st["mean_track_length"],
            st["observations"],
            st["mean_reproj_px"] or float("nan"),
        )
        infos.append(info)
    seconds = time.perf_counter() - t0

    # Assemble the parts, scene after scene, into memory-mappable files.
    datas = [np.load(parts / f"scene_{si:03d}.npz") for si in range(len(scenes))]
    num_points = sum(len(d["view_offsets"]) - 1 for d in datas)
    num_views = sum(len(d["views"]) for d in datas)
    if num_points == 0:
        raise InputError(f"{', '.join(map(str, scene_dirs))}: no multi-view tracks were found")
    vs = view_shape(patch_size, window_factor)
    pairs_tmp = temporary_path(out / PAIRS_FILE)
    views_tmp = temporary_path(out / VIEWS_FILE)
    pairs = np.lib.format.open_memmap(
        pairs_tmp, mode="w+", dtype=np.uint8, shape=(num_points, 2, *vs)
    )
    views = np.lib.format.open_memmap(views_tmp, mode="w+", dtype=np.uint8, shape=(num_views, *vs))
    offs: list[np.ndarray] = [np.zeros(1, np.int64)]
    counts: list[np.ndarray] = []
    images: list[str] = []
    pt0 = vw0 = img0 = 0
    cols: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "obs_image",
            "obs_xy",
            "obs_size",
            "obs_angle",
            "obs_err",
            "xyz",
            "point_scene",
            "scales",
        )
    }
    for si, (d, info) in enumerate(zip(datas, infos, strict=True)):
        vo = d["view_offsets"]
        t = len(vo) - 1
        v = d["views"]
        views[vw0 : vw0 + len(v)] = v
        pairs[pt0 : pt0 + t, 0] = v[vo[:-1]]
        pairs[pt0 : pt0 + t, 1] = v[vo[:-1] + d["second"]]
        offs.append(vo[1:] + vw0)
        counts.append(d["group_counts"])
        images += [f"{scenes[si].name}/{n}" for n in info["names"]]
        cols["obs_image"].append(d["obs_image"] + img0)
        for k in ("obs_xy", "obs_size", "obs_angle", "obs_err", "xyz", "scales"):
            cols[k].append(d[k])
        cols["point_scene"].append(np.full(t, si, np.int64))
        pt0, vw0, img0 = pt0 + t, vw0 + len(v), img0 + len(info["names"])
    pairs.flush()
    views.flush()
    del pairs, views
    for d in datas:
        d.close()
    atomic_save_npy(out / VIEW_OFFSETS_FILE, np.concatenate(offs))
    extra: dict[str, Any] = {k: np.concatenate(v) for k, v in cols.items()}
    atomic_write(out / TRACKS_FILE, lambda tmp: np.savez(tmp, **extra))
    os.replace(views_tmp, out / VIEWS_FILE)
    os.replace(pairs_tmp, out / PAIRS_FILE)
    group_offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(int)
    meta = {
        **settings,
        "images": images,
        "offsets": group_offsets.tolist(),
        "num_pairs": int(num_points),
        "num_views": int(num_views),
        "scenes": [info["stats"] for info in infos],
        "seconds": round(seconds, 2),
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return out


def build_multiview_pool_for(
    path: str | Path,
    cache_root: str | Path,
    patch_size: int,
    mr_size: float,
    window_factor: WindowFactor,
    seed: int,
    progress: Progress | None = None,
    frames: str | None = None,
) -> Path:
    """Build (or reuse) the multi-view pool of a scene folder or folder of scenes under
    ``cache_root``, named by the folder and a digest of the settings."""
    key = json.dumps(
        [
            str(Path(path).resolve()),
            patch_size,
            mr_size,
            window_factor,
            seed,
            "multiview",
            *frames_settings(frames).values(),
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out = Path(cache_root) / f"multiview-{Path(path).resolve().name}-{patch_size}px-{digest}"
    return build_multiview_pool(
        [path], out, patch_size, mr_size, window_factor, seed=seed, progress=progress, frames=frames
    )


__all__ = [
    "Camera",
    "read_cameras",
    "fundamental_matrix",
    "epipolar_distance",
    "view_pairs",
    "connected_components",
    "triangulate",
    "SceneTracks",
    "TrackConfig",
    "scene_tracks",
    "find_scenes",
    "cut_patches",
    "build_multiview_pool",
    "build_multiview_pool_for",
    "MultiviewPairPool",
]
