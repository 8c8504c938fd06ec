"""Tracks of a multi-view scene with known cameras: SIFT keypoints matched between
neighbouring views, checked against the epipolar geometry, joined into tracks and
triangulated (the observations a multi-view pool is cut from, see :mod:`.multiview`).

A scene is a folder with ``images/`` and ``cameras.txt`` (one line per image:
``name width height fx fy cx cy r11 .. r33 tx ty tz``; pinhole, world to camera
``x_cam = R @ X + t``, pixel centres at integers; see :func:`read_cameras`).
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
3. joins the matches into tracks (connected components over (image, keypoint) nodes, by
   ``scipy.sparse.csgraph``), drops tracks with two keypoints in one image or fewer than
   ``min_track`` views, triangulates every track from all its views (linear DLT, batched by
   track length: one SVD call per length for all tracks, where pycolmap's estimator works one
   point at a time) and keeps those in front of all their cameras whose reprojection error is
   below ``reproj_px`` in every view.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as _components

from ..cameras import Camera, epipolar_distance, fundamental_matrix, read_cameras
from ..describe import SiftDescriber
from ..detect import Keypoints, SiftDetector
from ..errors import ConfigError, InputError
from ..images import read_image, resize_max
from ..match import match_descriptors
from ..patches import DEFAULT_MR_SIZE
from .photos import _inside, _window_corners

Progress = Callable[[int, int, str], None]

CAMERAS_FILE = "cameras.txt"
IMAGES_DIR = "images"


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
    """Component label (its smallest node) of each of ``n`` nodes joined by edges ``a[k]-b[k]``
    (``scipy.sparse.csgraph.connected_components``). Shape: -> (n,) int64."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if len(a) == 0:
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    count, lab = _components(graph, directed=False)
    smallest = np.full(count, n, np.int64)
    np.minimum.at(smallest, lab, np.arange(n, dtype=np.int64))
    return smallest[lab]


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
        mt, _ = match_descriptors(descs[i], descs[j], conf.ratio, mutual=True)
        m = mt.numpy()
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
]
