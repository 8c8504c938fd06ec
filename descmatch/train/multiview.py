"""Training patches from real multi-view scenes with known cameras: patches of one 3D point seen
in several views, the way the Brown/PhotoTour patches were made.

A scene is a folder with ``images/`` and ``cameras.txt`` (one line per image:
``name width height fx fy cx cy r11 .. r33 tx ty tz``; pinhole, world to camera
``x_cam = R @ X + t``, pixel centres at integers; see :func:`read_cameras`). For each scene
:func:`scene_tracks`:

1. reads every image (gray, downscaled so its longer side is at most ``max_side``; the
   intrinsics are scaled to match, so the cameras stay exact), detects SIFT keypoints
   (:class:`~descmatch.detect.SiftDetector`), drops near-duplicates (one DoG extremum reported
   with several orientations) and keypoints whose patch window leaves the image, and describes
   them with RootSIFT;
2. matches every image with its ``pair_window`` nearest views by camera-centre distance among
   the views whose optical axes are within ``max_view_angle`` degrees (mutual nearest neighbour
   + ratio test), and keeps the matches whose epipolar distance under the fundamental matrix of
   the known cameras is below ``epipolar_px`` in both images;
3. joins the matches into tracks (connected components over (image, keypoint) nodes), drops
   tracks with two keypoints in one image or fewer than ``min_track`` views, triangulates every
   track from all its views (linear DLT, batched by track length) and keeps those in front of
   all their cameras whose reprojection error is below ``reproj_px`` in every view.

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
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cameras import Camera, epipolar_distance, fundamental_matrix, read_cameras
from ..describe import SiftDescriber
from ..detect import Keypoints, SiftDetector
from ..errors import ConfigError, InputError
from ..images import read_image, resize_max
from ..match import match_descriptors
from ..nets.frames import refine_frames
from ..patches import DEFAULT_MR_SIZE, build_pyramid, extract_patches
from .photos import _inside, _window_corners
from .pool import (
    META_FILE,
    PAIRS_FILE,
    POOL_FORMAT,
    POOL_VERSION,
    PairPool,
    _frames_net,
    frames_settings,
    is_pool,
    start_pool_build,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

CAMERAS_FILE = "cameras.txt"
IMAGES_DIR = "images"
VIEWS_FILE = "views.npy"
VIEW_OFFSETS_FILE = "view_offsets.npy"
TRACKS_FILE = "tracks.npz"
PARTS_DIR = "parts"


# --------------------------------------------------------------------------------------------
# Cameras


def view_pairs(
    cams: Sequence[Camera], pair_window: int, max_view_angle: float = 60.0
) -> list[tuple[int, int]]:
    """Pairs (i < j) to match: each view with its ``pair_window`` nearest views by camera-centre
    distance, among the views whose optical axes differ by at most ``max_view_angle`` degrees."""
    n = len(cams)
    if n < 2 or pair_window < 1:
        return []
    c = np.stack([cam.center for cam in cams])
    a = np.stack([cam.axis for cam in cams])
    dist = np.linalg.norm(c[:, None] - c[None], axis=2)
    cosang = np.clip(a @ a.T, -1.0, 1.0)
    dist[cosang < math.cos(math.radians(max_view_angle))] = np.inf
    np.fill_diagonal(dist, np.inf)
    pairs: set[tuple[int, int]] = set()
    for i in range(n):
        for j in np.argsort(dist[i], kind="stable")[:pair_window]:
            if np.isfinite(dist[i, j]):
                pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


# --------------------------------------------------------------------------------------------
# Tracks


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (its smallest node) of each of ``n`` nodes joined by edges ``a[k]-b[k]``:
    union-find as vectorised label propagation with pointer jumping. Shape: -> (n,) int64."""
    lab = np.arange(n, dtype=np.int64)
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if len(a) == 0:
        return lab
    while True:
        m = np.minimum(lab[a], lab[b])
        new = lab.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        while True:  # pointer jumping: every label to its root
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, lab):
            return lab
        lab = new


def triangulate(
    cams: Sequence[Camera],
    obs_image: np.ndarray,
    obs_xy: np.ndarray,
    offsets: np.ndarray,
    chunk: int = 20000,
) -> np.ndarray:
    """Linear (DLT) triangulation of every track from all its views, batched by track length.

    The observations of track k are rows ``offsets[k]:offsets[k+1]``. The system is solved in
    normalised image coordinates (``K^-1 x``) and in a world frame centred and scaled on the
    camera centres, for conditioning. Shape: obs_image (M,), obs_xy (M,2), offsets (T+1,) ->
    (T,3) float64 (NaN where the point is at infinity).
    """
    obs_image = np.asarray(obs_image, np.int64)
    centers = np.stack([c.center for c in cams])
    c0 = centers.mean(0)
    scale = float(np.linalg.norm(centers - c0, axis=1).mean()) or 1.0
    tmat = np.eye(4)
    tmat[:3, :3] *= scale
    tmat[:3, 3] = c0
    proj = np.stack([np.hstack([c.R, c.t[:, None]]) @ tmat for c in cams])  # (N,3,4)
    kinv = np.stack([np.linalg.inv(c.K) for c in cams])
    h = np.hstack([np.asarray(obs_xy, np.float64), np.ones((len(obs_xy), 1))])
    u = np.einsum("mij,mj->mi", kinv[obs_image], h)
    u = u[:, :2] / u[:, 2:3]
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    out = np.full((len(lengths), 3), np.nan)
    for length in np.unique(lengths):
        if length < 2:
            continue
        tracks = np.flatnonzero(lengths == length)
        for s in range(0, len(tracks), chunk):
            tk = tracks[s : s + chunk]
            idx = offsets[tk][:, None] + np.arange(length)  # (n,L)
            p = proj[obs_image[idx]]  # (n,L,3,4)
            uu = u[idx]  # (n,L,2)
            rows = np.concatenate(
                [uu[..., 0:1] * p[:, :, 2] - p[:, :, 0], uu[..., 1:2] * p[:, :, 2] - p[:, :, 1]],
                axis=1,
            )
            rows /= np.maximum(np.linalg.norm(rows, axis=2, keepdims=True), 1e-12)
            x = np.linalg.svd(rows)[2][:, -1]  # (n,4): the null vector
            xw = x @ tmat.T
            with np.errstate(divide="ignore", invalid="ignore"):
                pts = xw[:, :3] / xw[:, 3:4]
            pts[np.abs(x[:, 3]) < 1e-12] = np.nan
            out[tk] = pts
    return out


@dataclass
class SceneTracks:
    """The tracks of one scene.

    ``cameras`` are those of the images as used (downscaled by ``scales``); keypoints in those
    images. The observations of track k are rows ``offsets[k]:offsets[k+1]``, in image order.
    Shape: images list of (H,W) float32; obs_image, obs_kp (M,) int64; obs_xy (M,2),
    obs_size, obs_angle (M,) float32; obs_err (M,) float64 (reprojection error, px);
    offsets (T+1,) int64; xyz (T,3) float64.
    """

    name: str
    names: list[str]
    cameras: list[Camera]
    scales: list[tuple[float, float]]
    images: list[np.ndarray] = field(repr=False)
    obs_image: np.ndarray
    obs_kp: np.ndarray
    obs_xy: np.ndarray
    obs_size: np.ndarray
    obs_angle: np.ndarray
    obs_err: np.ndarray
    offsets: np.ndarray
    xyz: np.ndarray
    stats: dict[str, Any]

    @property
    def num_tracks(self) -> int:
        return int(len(self.offsets) - 1)


def _dedupe_positions(kp: Keypoints) -> np.ndarray:
    """Indices of keypoints left after dropping those at the same pixel and size (within a
    quarter octave) as a stronger one: OpenCV reports an extremum once per orientation, and
    such twins would make tracks with two keypoints in one image. Shape: -> (M,) sorted."""
    if len(kp) == 0:
        return np.zeros(0, np.int64)
    key = np.stack(
        [
            np.round(kp.xy[:, 0]),
            np.round(kp.xy[:, 1]),
            np.round(np.log2(np.maximum(kp.size, 1e-3)) * 4),
        ],
        1,
    ).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    return np.sort(first)


def find_scenes(path: str | Path) -> list[Path]:
    """A scene folder (with ``cameras.txt``) or a folder of scene folders, sorted by name."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such folder")
    if (path / CAMERAS_FILE).is_file():
        return [path]
    scenes = sorted(p for p in path.iterdir() if p.is_dir() and (p / CAMERAS_FILE).is_file())
    if not scenes:
        raise InputError(
            f"{path}: neither a multi-view scene ({CAMERAS_FILE} + {IMAGES_DIR}/) "
            "nor a folder of scenes"
        )
    return scenes


@dataclass(frozen=True)
class TrackConfig:
    """How one scene's tracks are made (see the module docstring)."""

    max_keypoints: int = 4000
    max_side: int | None = 1024
    pair_window: int = 5
    max_view_angle: float = 60.0
    ratio: float = 0.8
    epipolar_px: float = 2.0
    reproj_px: float = 2.0
    min_track: int = 2
    window: float = DEFAULT_MR_SIZE  # patch window side / keypoint size (mr_size x factor)
    margin: float = 1.0

    def __post_init__(self) -> None:
        if self.min_track < 2:
            raise ConfigError(f"min_track must be >= 2, got {self.min_track}")
        if self.pair_window < 1 or self.max_keypoints < 1:
            raise ConfigError("pair_window and max_keypoints must be >= 1")
        if self.epipolar_px <= 0 or self.reproj_px <= 0:
            raise ConfigError("epipolar_px and reproj_px must be > 0")


def scene_tracks(
    scene: str | Path, conf: TrackConfig = TrackConfig(), progress: Progress | None = None
) -> SceneTracks:
    """Detect, match, check against the cameras, join into tracks and triangulate one scene
    (see the module docstring). ``progress(i, n, text)`` is called per image and per pair."""
    scene = Path(scene)
    t0 = time.perf_counter()
    cams_all = read_cameras(scene / CAMERAS_FILE)
    names = list(cams_all)
    img_dir = scene / IMAGES_DIR
    detector = SiftDetector(max_keypoints=conf.max_keypoints)
    describer = SiftDescriber(root=True)
    images: list[np.ndarray] = []
    cams: list[Camera] = []
    scales: list[tuple[float, float]] = []
    kps: list[Keypoints] = []
    descs: list[torch.Tensor] = []
    n_steps = len(names)
    for i, name in enumerate(names):
        path = img_dir / name
        if not path.is_file():
            raise InputError(f"{scene / CAMERAS_FILE}: image {name} is not in {img_dir}")
        full = read_image(path)
        cam = cams_all[name]
        if full.shape != (cam.height, cam.width):
            raise InputError(
                f"{path}: the image is {full.shape[1]}x{full.shape[0]}, "
                f"{CAMERAS_FILE} says {cam.width}x{cam.height}"
            )
        img, (sx, sy) = resize_max(full, conf.max_side)
        cam = cam.scaled(sx, sy) if (sx, sy) != (1.0, 1.0) else cam
        kp = detector(img)
        kp = kp.select(_dedupe_positions(kp))
        if len(kp):
            corners = _window_corners(kp.xy, kp.size, kp.angle, conf.window)
            kp = kp.select(
                np.flatnonzero(_inside(corners, img.shape[1], img.shape[0], conf.margin))
            )
        desc = describer(img, kp)
        images.append(img)
        cams.append(cam)
        scales.append((sx, sy))
        kps.append(kp)
        descs.append(torch.from_numpy(desc))
        if progress:
            progress(i + 1, n_steps, f"{scene.name}: {name} {len(kp)} keypoints")
    t_detect = time.perf_counter() - t0

    # Matches between neighbouring views, checked against the known epipolar geometry.
    pairs = view_pairs(cams, conf.pair_window, conf.max_view_angle)
    start = np.concatenate([[0], np.cumsum([len(k) for k in kps])]).astype(np.int64)
    edges_a, edges_b = [], []
    n_matches = 0
    for p, (i, j) in enumerate(pairs):
        m, _ = match_descriptors(descs[i], descs[j], conf.ratio, mutual=True)
        m = m.numpy()
        a = np.flatnonzero(m >= 0)
        b = m[a]
        n_matches += len(a)
        if len(a):
            d = epipolar_distance(fundamental_matrix(cams[i], cams[j]), kps[i].xy[a], kps[j].xy[b])
            ok = d < conf.epipolar_px
            edges_a.append(start[i] + a[ok])
            edges_b.append(start[j] + b[ok])
        if progress:
            progress(p + 1, len(pairs), f"{scene.name}: pair {names[i]}-{names[j]}")
    ea = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
    eb = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
    t_match = time.perf_counter() - t0 - t_detect

    # Tracks: connected components over the matched keypoints.
    nodes, inv = np.unique(np.concatenate([ea, eb]), return_inverse=True)
    inv = inv.reshape(-1)
    label = connected_components(len(nodes), inv[: len(ea)], inv[len(ea) :])
    node_image = np.searchsorted(start, nodes, side="right") - 1
    order = np.lexsort((node_image, label))
    label, node_image, nodes = label[order], node_image[order], nodes[order]
    first = np.flatnonzero(np.r_[True, label[1:] != label[:-1]])
    counts = np.diff(np.r_[first, len(label)])
    run = np.repeat(np.arange(len(first)), counts)
    same_image = (label[1:] == label[:-1]) & (node_image[1:] == node_image[:-1])
    conflict = np.zeros(len(first), bool)
    conflict[run[1:][same_image]] = True
    keep_track = ~conflict & (counts >= conf.min_track)
    keep_obs = keep_track[run]
    obs_image = node_image[keep_obs]
    obs_node = nodes[keep_obs]
    obs_kp = obs_node - start[obs_image]
    offsets = np.concatenate([[0], np.cumsum(counts[keep_track])]).astype(np.int64)
    all_xy = np.concatenate([k.xy for k in kps]).astype(np.float64)
    obs_xy = all_xy[obs_node]

    # Triangulate, then keep tracks in front of all cameras within reproj_px in every view.
    xyz = triangulate(cams, obs_image, obs_xy, offsets)
    err = np.full(len(obs_image), np.inf)
    depth = np.full(len(obs_image), -1.0)
    track_of_obs = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    for g in np.unique(obs_image):
        rows = np.flatnonzero(obs_image == g)
        pix, z = cams[g].project(xyz[track_of_obs[rows]])
        err[rows] = np.linalg.norm(pix - obs_xy[rows], axis=1)
        depth[rows] = z
    bad_obs = ~(np.nan_to_num(err, nan=np.inf) < conf.reproj_px) | ~(depth > 0)
    bad_track = np.zeros(len(offsets) - 1, bool)
    np.logical_or.at(bad_track, track_of_obs, bad_obs)
    good = ~bad_track
    good_obs = good[track_of_obs]
    lengths = np.diff(offsets)[good]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    sel = np.flatnonzero(good_obs)
    obs_image, obs_kp, obs_xy, err = obs_image[sel], obs_kp[sel], obs_xy[sel], err[sel]
    obs_size = np.concatenate([k.size for k in kps])[obs_node[sel]].astype(np.float32)
    obs_angle = np.concatenate([k.angle for k in kps])[obs_node[sel]].astype(np.float32)
    xyz = xyz[good]
    stats = {
        "scene": scene.name,
        "images": len(names),
        "keypoints": int(start[-1]),
        "view_pairs": len(pairs),
        "matches": int(n_matches),
        "epipolar_inliers": int(len(ea)),
        "candidate_tracks": int(len(first)),
        "conflicting_tracks": int(conflict.sum()),
        "short_tracks": int((~conflict & (counts < conf.min_track)).sum()),
        "failed_reprojection": int(bad_track.sum()),
        "tracks": int(len(lengths)),
        "mean_track_length": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
        "max_track_length": int(lengths.max()) if len(lengths) else 0,
        "observations": int(len(obs_image)),
        "mean_reproj_px": round(float(err.mean()), 4) if len(err) else None,
        "median_reproj_px": round(float(np.median(err)), 4) if len(err) else None,
        "seconds_detect": round(t_detect, 2),
        "seconds_match": round(t_match, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return SceneTracks(
        scene.name,
        names,
        cams,
        scales,
        images,
        obs_image.astype(np.int64),
        obs_kp.astype(np.int64),
        obs_xy.astype(np.float32),
        obs_size,
        obs_angle,
        err,
        new_offsets,
        xyz,
        stats,
    )


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
    window_factor: float,
    frames: Any = None,
    frames_mr_size: float = DEFAULT_MR_SIZE,
) -> np.ndarray:
    """Patches of observations ``rows`` of a scene, cut at the detected keypoints (in the
    refined frames of a ``frames`` net when one is given), one
    :func:`~descmatch.patches.extract_patches` call per image. Shape: -> (len(rows),P,P) uint8."""
    out = np.zeros((len(rows), patch_size, patch_size), np.uint8)
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
            out[sel] = (p[:, 0] * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _make_scene_part(
    scene: Path,
    index: int,
    parts: Path,
    conf: TrackConfig,
    patch_size: int,
    mr_size: float,
    window_factor: float,
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
    _atomic_savez(
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
    _atomic_write_text(parts / f"scene_{index:03d}.json", json.dumps(info))
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
    window_factor: float = 1.0,
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
        window=mr_size * window_factor,
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
    p = patch_size
    pairs_tmp = out / (PAIRS_FILE + ".tmp.npy")
    views_tmp = out / (VIEWS_FILE + ".tmp.npy")
    pairs = np.lib.format.open_memmap(
        pairs_tmp, mode="w+", dtype=np.uint8, shape=(num_points, 2, p, p)
    )
    views = np.lib.format.open_memmap(views_tmp, mode="w+", dtype=np.uint8, shape=(num_views, p, p))
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
    _atomic_save_npy(out / VIEW_OFFSETS_FILE, np.concatenate(offs))
    extra = {k: np.concatenate(v) for k, v in cols.items()}
    _atomic_savez(out / TRACKS_FILE, **extra)
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
    _atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return out


def build_multiview_pool_for(
    path: str | Path,
    cache_root: str | Path,
    patch_size: int,
    mr_size: float,
    window_factor: float,
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


# --------------------------------------------------------------------------------------------
# Serving


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
        if views.ndim != 3 or views.shape[1] != views.shape[2]:
            raise ValueError(f"views must be (M,P,P), got {views.shape}")
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
        meta = json.loads((path / META_FILE).read_text())
        if (
            meta.get("format") != POOL_FORMAT
            or meta.get("version") != POOL_VERSION
            or meta.get("kind") != "multiview"
        ):
            raise InputError(f"{path}: not a {POOL_FORMAT} v{POOL_VERSION} multi-view pool")
        for f in (VIEWS_FILE, VIEW_OFFSETS_FILE):
            if not (path / f).is_file():
                raise InputError(f"{path}: the multi-view pool has no {f}")
        views = np.load(path / VIEWS_FILE, mmap_mode="r")
        offsets = np.load(path / VIEW_OFFSETS_FILE)
        if len(offsets) - 1 != meta["num_pairs"] or len(views) != meta.get("num_views"):
            raise InputError(f"{path}: {VIEWS_FILE}/{VIEW_OFFSETS_FILE} do not fit meta.json")
        pairs = np.load(path / PAIRS_FILE, mmap_mode="r")
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
        flat = np.empty((len(idx), self.patch_size, self.patch_size), np.uint8)
        flat[order] = got
        return flat.reshape(len(rows), 2, self.patch_size, self.patch_size)

    def subset(self, points: np.ndarray, group_offsets: np.ndarray | None) -> MultiviewPairPool:
        out = MultiviewPairPool.__new__(MultiviewPairPool)
        out.__dict__.update(self.__dict__)
        out.point_rows = self.point_rows[np.asarray(points, np.int64)]
        out.group_offsets = None if group_offsets is None else np.asarray(group_offsets, np.int64)
        return out


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
