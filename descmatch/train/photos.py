"""Self-supervised matching patch pairs from any photo: a random homography plus a photometric
change, SIFT keypoints, and the patches at corresponding places in the two images.

For one photo (gray float in [0,1], downscaled so its longer side is at most ``max_side``):

1. draw a random homography ``H`` (rotation, log-uniform scale, a little anisotropy, perspective,
   translation, all about the image centre) and warp the photo with it (pre-blurred when ``H``
   shrinks, so the warp does not alias);
2. give both the source and the warp an independent photometric change (contrast, brightness,
   gamma, blur, noise, JPEG re-encoding);
3. detect SIFT keypoints in the source and map them through ``H``: the position is ``H(x)``, the
   size is scaled by the local scale of ``H`` (``sqrt|det J|``, ``J`` the Jacobian of ``H`` at
   the point) and the orientation is the keypoint's direction ``(cos a, sin a)`` (OpenCV's
   convention in image coordinates, y down, as :mod:`descmatch.patches` uses it) mapped by
   ``J``; for a similarity this is the angle plus the rotation of ``H``;
4. ``pairing="detected"`` (default) also detects in the warp and pairs each source keypoint with
   a warp keypoint whose position agrees with the mapped one within ``max_pair_px`` pixels, its
   size within ``max_size_ratio`` and its orientation within ``max_angle_diff`` degrees, so the
   pairs carry the detector's own noise (position, scale, orientation). When fewer than
   ``min_detected_pairs`` are found (flat or repetitive photos) the mapped keypoints are used.
   ``pairing="mapped"`` always uses the mapped keypoints;
5. keep the pairs whose whole window lies inside both images and whose warp window shows
   source pixels (no black fill), at most ``max_pairs`` of them, drawn at random, and cut all
   patches of each image with one :func:`~descmatch.patches.extract_patches` call.

Every pair is its own 3D point. Many pairs come from one photo, so batches that gather many
points of the same photo have hard negatives (similar texture, repeated structure).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from ..detect import SiftDetector
from ..errors import ConfigError
from ..geometry import apply_homography, homography_jacobian, map_keypoints  # noqa: F401
from ..images import read_image, resize_max
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

PAIRINGS = ("detected", "mapped")
#: How :func:`map_keypoints` maps orientations (part of pool settings and names).
ANGLE_MAP = "gradient"


@dataclass(frozen=True)
class PhotoPairConfig:
    """How the second view of a photo is made and how keypoints are paired.

    Geometry: rotation uniform in ``+-max_rotation`` degrees, scale log-uniform in
    ``scale_range``, x/y scale ratio log-uniform in ``1/(1+anisotropy) .. 1+anisotropy``,
    perspective terms uniform in ``+-perspective`` (the homogeneous coordinate changes by up to
    that fraction from the centre to an edge), translation uniform in ``+-translation`` of the
    image size. ``max_tilt`` > 1 adds an area-preserving tilt, the affine foreshortening of a
    camera turned away from the plane (ASIFT's tilt ``t = 1/cos(theta)``): the image is
    stretched by ``sqrt(t)`` along a random direction and shrunk by ``sqrt(t)`` across it,
    with ``t`` log-uniform in ``1..max_tilt``. Photometry (each image independently):
    contrast in ``contrast``, brightness offset in ``+-brightness``, gamma log-uniform in
    ``gamma``, Gaussian blur (sigma in ``blur_sigma``) with probability ``blur_prob``, Gaussian
    noise of std up to ``noise``, JPEG re-encoding (quality in ``jpeg_quality``) with
    probability ``jpeg_prob``.
    """

    max_side: int = 640
    max_rotation: float = 30.0
    scale_range: tuple[float, float] = (0.6, 1.5)
    anisotropy: float = 0.1
    perspective: float = 0.15
    max_tilt: float = 1.0
    translation: float = 0.1
    contrast: tuple[float, float] = (0.7, 1.3)
    brightness: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.4)
    blur_prob: float = 0.25
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    noise: float = 0.02
    jpeg_prob: float = 0.5
    jpeg_quality: tuple[int, int] = (40, 95)
    photometric_source: bool = True
    pairing: str = "detected"
    max_pair_px: float = 2.0
    max_size_ratio: float = 1.2
    max_angle_diff: float = 30.0
    min_detected_pairs: int = 32
    margin: float = 1.0
    max_keypoints: int = 4000

    def __post_init__(self) -> None:
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"unknown pairing {self.pairing!r}; valid: {', '.join(PAIRINGS)}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"scale_range must be 0 < lo <= hi, got {self.scale_range}")
        if not (math.isfinite(self.max_tilt) and self.max_tilt >= 1.0):
            raise ConfigError(f"max_tilt must be a number >= 1, got {self.max_tilt}")
        if not (self.max_size_ratio > 1.0 and 0.0 < self.max_angle_diff <= 180.0):
            raise ConfigError(
                "pairs need max_size_ratio > 1 and 0 < max_angle_diff <= 180, got "
                f"{self.max_size_ratio} and {self.max_angle_diff}"
            )

    def settings(self) -> dict[str, Any]:
        """The fields as a dict for pool metadata and names, with how orientations are mapped
        (pools made before orientations mapped as gradients get other names: not reused)."""
        return {**asdict(self), "angle_map": ANGLE_MAP}

    @classmethod
    def of_pairs(cls, max_tilt: float, pair_angle: float, pair_scale: float) -> PhotoPairConfig:
        """The defaults with the training options ``--max-tilt``, ``--pair-angle`` (degrees
        a detected pair's orientations may differ) and ``--pair-scale`` (their size ratio)."""
        return cls(max_tilt=max_tilt, max_angle_diff=pair_angle, max_size_ratio=pair_scale)


@dataclass
class PhotoPairs:
    """Matching patch pairs of one photo and where they were cut.

    Shape: patches (K,2,P,P) uint8 (``[:,0]`` source, ``[:,1]`` warp); src_xy, dst_xy (K,2);
    src_size, src_angle, dst_size, dst_angle (K,) float32; H (3,3) source -> warp pixels.
    ``mode`` is the pairing actually used ("detected" or "mapped"). ``surround`` (K,2,P,P)
    uint8, when asked for: the same pairs cut over twice the window at half the resolution.
    """

    patches: np.ndarray
    src_xy: np.ndarray
    src_size: np.ndarray
    src_angle: np.ndarray
    dst_xy: np.ndarray
    dst_size: np.ndarray
    dst_angle: np.ndarray
    H: np.ndarray
    mode: str
    surround: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.patches.shape[0])


def random_homography(
    width: int, height: int, rng: np.random.Generator, conf: PhotoPairConfig = PhotoPairConfig()
) -> np.ndarray:
    """A random homography about the image centre. Shape: -> (3,3) float64, source -> warp."""
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    angle = math.radians(rng.uniform(-conf.max_rotation, conf.max_rotation))
    lo, hi = conf.scale_range
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    aniso = math.exp(rng.uniform(-1.0, 1.0) * math.log1p(conf.anisotropy))
    px, py = rng.uniform(-conf.perspective, conf.perspective, 2)
    tx, ty = rng.uniform(-conf.translation, conf.translation, 2) * np.array([width, height])
    c, s = math.cos(angle), math.sin(angle)
    center = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]], np.float64)
    persp = np.array([[1, 0, 0], [0, 1, 0], [px / max(cx, 1.0), py / max(cy, 1.0), 1]])
    affine = np.array(
        [[scale * math.sqrt(aniso), 0, 0], [0, scale / math.sqrt(aniso), 0], [0, 0, 1]]
    )
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    back = np.array([[1, 0, cx + tx], [0, 1, cy + ty], [0, 0, 1]])
    tilt = np.eye(3)
    if conf.max_tilt > 1.0:  # drawn last: without tilt, the same homographies as before
        t = math.exp(rng.uniform(0.0, math.log(conf.max_tilt)))
        phi = rng.uniform(0.0, math.pi)
        u = np.array([math.cos(phi), math.sin(phi)])
        v = np.array([-u[1], u[0]])
        tilt[:2, :2] = math.sqrt(t) * np.outer(u, u) + np.outer(v, v) / math.sqrt(t)
    h = back @ rot @ tilt @ affine @ persp @ center
    return h / h[2, 2]


def _window_corners(
    xy: np.ndarray, size: np.ndarray, angle: np.ndarray, window_scale: float
) -> np.ndarray:
    """Corners of each rotated square patch window. Shape: -> (N,4,2)."""
    half = np.asarray(size, np.float64) * window_scale / 2.0
    t = np.deg2rad(np.asarray(angle, np.float64))
    c, s = np.cos(t), np.sin(t)
    signs = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64)  # (4,2)
    ox = signs[None, :, 0] * c[:, None] - signs[None, :, 1] * s[:, None]
    oy = signs[None, :, 0] * s[:, None] + signs[None, :, 1] * c[:, None]
    return np.asarray(xy, np.float64)[:, None, :] + np.stack([ox, oy], -1) * half[:, None, None]


def _inside(pts: np.ndarray, width: int, height: int, margin: float) -> np.ndarray:
    """All points of each row inside the image. Shape: (N,K,2) -> (N,) bool."""
    x, y = pts[..., 0], pts[..., 1]
    ok = (x >= margin) & (y >= margin) & (x <= width - 1 - margin) & (y <= height - 1 - margin)
    return np.asarray(ok.all(axis=-1), dtype=bool)


def warp_image(image: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Warp with ``h`` into an image of the same size, black outside; the source is blurred first
    when ``h`` shrinks it (scale at the centre below 1) so the warp does not alias.

    Shape: (H,W) float32 -> (H,W) float32.
    """
    height, width = image.shape
    centre = np.array([[(width - 1) / 2.0, (height - 1) / 2.0]])
    scale = float(np.sqrt(abs(np.linalg.det(homography_jacobian(h, centre)[0]))))
    src = image
    if scale < 0.95:
        sigma = 0.5 * math.sqrt(1.0 / scale**2 - 1.0)
        src = cv2.GaussianBlur(image, (0, 0), sigma)
    return cv2.warpPerspective(
        src,
        h,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )


def photometric(
    image: np.ndarray, rng: np.random.Generator, conf: PhotoPairConfig = PhotoPairConfig()
) -> np.ndarray:
    """A random photometric change. Shape: (H,W) float32 [0,1] -> (H,W) float32 [0,1]."""
    img = image.astype(np.float32, copy=True)
    contrast = rng.uniform(*conf.contrast)
    brightness = rng.uniform(-conf.brightness, conf.brightness)
    gamma = math.exp(rng.uniform(math.log(conf.gamma[0]), math.log(conf.gamma[1])))
    do_blur = rng.random() < conf.blur_prob
    sigma = rng.uniform(*conf.blur_sigma)
    noise = rng.uniform(0.0, conf.noise)
    do_jpeg = rng.random() < conf.jpeg_prob
    quality = int(rng.integers(conf.jpeg_quality[0], conf.jpeg_quality[1] + 1))
    mean = float(img.mean())
    img = np.clip((img - mean) * contrast + mean + brightness, 0.0, 1.0)
    img = np.power(img, gamma, dtype=np.float32)
    if do_blur:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if noise > 0:
        img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    img8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if do_jpeg:
        ok, buf = cv2.imencode(".jpg", img8, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            img8 = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return img8.astype(np.float32) / 255.0


def _dedupe(xy: np.ndarray, size: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Indices of keypoints left after dropping near-duplicates of a stronger one (same pixel,
    size within a quarter octave, angle within 20 degrees): the detector reports one DoG
    extremum at several octaves and orientations, and those would be near-identical "different
    points" in a batch. Keypoints are strongest first. Shape: -> (M,) sorted indices."""
    if len(xy) == 0:
        return np.zeros(0, np.int64)
    key = np.stack(
        [
            np.round(xy[:, 0]),
            np.round(xy[:, 1]),
            np.round(np.log2(np.maximum(size, 1e-3)) * 4),
            np.round(angle / 20.0) % 18,
        ],
        1,
    ).astype(np.int64)
    _, first = np.unique(key, axis=0, return_index=True)
    return np.sort(first)


def _pair_detected(
    m_xy: np.ndarray,
    m_size: np.ndarray,
    m_angle: np.ndarray,
    d_xy: np.ndarray,
    d_size: np.ndarray,
    d_angle: np.ndarray,
    conf: PhotoPairConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair mapped source keypoints with detected warp keypoints, one to one.

    A candidate agrees in position (``<= max_pair_px``), size (ratio ``<= max_size_ratio``) and
    orientation (``<= max_angle_diff``); the best candidate of each source keypoint is the one
    with the smallest normalised disagreement, and a warp keypoint taken twice keeps its best
    source keypoint. Candidates are found through the warp keypoints sorted by x (only those
    within ``max_pair_px`` in x are compared), so the cost is about linear.
    Shape: -> (L,) source indices, (L,) warp indices, sorted by source index.
    """
    n, m = len(m_xy), len(d_xy)
    empty = np.zeros(0, np.int64)
    if n == 0 or m == 0:
        return empty, empty
    r = conf.max_pair_px
    order = np.argsort(d_xy[:, 0], kind="stable")
    xs = d_xy[order, 0]
    lo = np.searchsorted(xs, m_xy[:, 0] - r, side="left")
    hi = np.searchsorted(xs, m_xy[:, 0] + r, side="right")
    count = hi - lo
    if count.sum() == 0:
        return empty, empty
    si = np.repeat(np.arange(n), count)
    # Position k of source i's run -> lo[i] + (k - start of the run).
    starts = np.cumsum(count) - count
    wj = order[lo[si] + np.arange(len(si)) - starts[si]]
    dist = np.sqrt(((m_xy[si].astype(np.float64) - d_xy[wj]) ** 2).sum(1))
    log_ratio = math.log(conf.max_size_ratio)
    lr = np.abs(np.log(np.maximum(m_size[si], 1e-6)) - np.log(np.maximum(d_size[wj], 1e-6)))
    da = np.abs((m_angle[si] - d_angle[wj] + 180.0) % 360.0 - 180.0)
    ok = (dist <= r) & (lr <= log_ratio) & (da <= conf.max_angle_diff)
    si, wj = si[ok], wj[ok]
    cost = dist[ok] / r + lr[ok] / log_ratio + da[ok] / max(conf.max_angle_diff, 1e-6)
    # Best candidate per source, then best source per warp keypoint.
    by_cost = np.argsort(cost, kind="stable")
    _, first = np.unique(si[by_cost], return_index=True)
    best = by_cost[first]
    best = best[np.argsort(cost[best], kind="stable")]
    _, first_w = np.unique(wj[best], return_index=True)
    keep = best[first_w]
    keep = keep[np.argsort(si[keep], kind="stable")]
    return si[keep], wj[keep]


def photo_pairs(
    image: np.ndarray,
    rng: np.random.Generator,
    conf: PhotoPairConfig = PhotoPairConfig(),
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: WindowFactor = 1.0,
    max_pairs: int = 512,
    detector: SiftDetector | None = None,
    frames: Any = None,
    frames_mr_size: float = DEFAULT_MR_SIZE,
    surround: bool = False,
) -> PhotoPairs:
    """Matching patch pairs of one photo under a random homography and photometric change.

    ``image`` is used at its size (callers downscale it: :func:`load_photo`). The patches are
    cut like the describers cut them: window side ``mr_size * window_factor * size`` pixels,
    rotated to the keypoint orientation, from an antialiasing pyramid. With a ``frames`` net
    (:class:`~descmatch.nets.frames.FrameNet`) both keypoints of each pair are cut in its
    refined frames, as the describers that use it cut them; pairing uses the detector's.
    ``surround``: also cut every pair over twice the window at the same patch size (where
    the window leaves the image, its border pixels are repeated, as at inference).

    Shape: image (H,W) float32 in [0,1] -> PhotoPairs with patches (K,2,P,P) uint8, K <= max_pairs.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be (H,W), got {image.shape}")
    image = np.ascontiguousarray(image, dtype=np.float32)
    height, width = image.shape
    h = random_homography(width, height, rng, conf)
    h_inv = np.linalg.inv(h)
    warped = warp_image(image, h)
    src = photometric(image, rng, conf) if conf.photometric_source else image
    dst = photometric(warped, rng, conf)
    det = detector if detector is not None else SiftDetector(max_keypoints=conf.max_keypoints)
    win = mr_size * window_span(window_factor)

    kp = det(src)
    keep = _dedupe(kp.xy, kp.size, kp.angle)
    s_xy, s_size, s_angle = kp.xy[keep], kp.size[keep], kp.angle[keep]
    m_xy, m_size, m_angle, front = map_keypoints(h, s_xy, s_size, s_angle)

    def dst_ok(xy: np.ndarray, size: np.ndarray, angle: np.ndarray) -> np.ndarray:
        corners = _window_corners(xy, size, angle, win)
        back, w = apply_homography(h_inv, corners.reshape(-1, 2))
        back_ok = _inside(back.reshape(-1, 4, 2), width, height, conf.margin)
        return (
            _inside(corners, width, height, conf.margin) & back_ok & (w.reshape(-1, 4) > 0).all(1)
        )

    src_ok = _inside(_window_corners(s_xy, s_size, s_angle, win), width, height, conf.margin)
    valid_src = front & src_ok
    mapped_idx = np.flatnonzero(valid_src & dst_ok(m_xy, m_size, m_angle))

    mode = "mapped"
    sel_src, d_xy, d_size, d_angle = (
        mapped_idx,
        m_xy[mapped_idx],
        m_size[mapped_idx],
        m_angle[mapped_idx],
    )
    if conf.pairing == "detected":
        kd = det(dst)
        dk = _dedupe(kd.xy, kd.size, kd.angle)
        w_xy, w_size, w_angle = kd.xy[dk], kd.size[dk], kd.angle[dk]
        w_valid = np.flatnonzero(dst_ok(w_xy, w_size, w_angle))
        cand = np.flatnonzero(valid_src)
        si, wj = _pair_detected(
            m_xy[cand],
            m_size[cand],
            m_angle[cand],
            w_xy[w_valid],
            w_size[w_valid],
            w_angle[w_valid],
            conf,
        )
        enough = len(si) >= min(conf.min_detected_pairs, max_pairs)
        if enough or len(si) >= len(mapped_idx):
            mode = "detected"
            sel_src = cand[si]
            wsel = w_valid[wj]
            d_xy, d_size, d_angle = w_xy[wsel], w_size[wsel], w_angle[wsel]

    if len(sel_src) > max_pairs:
        pick = np.sort(rng.choice(len(sel_src), size=max_pairs, replace=False))
        sel_src, d_xy, d_size, d_angle = sel_src[pick], d_xy[pick], d_size[pick], d_angle[pick]
    a_xy, a_size, a_angle = s_xy[sel_src], s_size[sel_src], s_angle[sel_src]

    k = len(sel_src)
    if frames is not None and k:
        a_size, a_angle = refine_frames(
            frames, torch.from_numpy(src), a_xy, a_size, a_angle, frames_mr_size
        )
        d_size, d_angle = refine_frames(
            frames, torch.from_numpy(dst), d_xy, d_size, d_angle, frames_mr_size
        )
    factors: list[WindowFactor] = [window_factor]
    if surround:
        if isinstance(window_factor, tuple):
            raise ValueError("photo_pairs: a surround cut needs one window factor")
        factors.append(2.0 * window_factor)
    cuts = [np.empty((k, 2, *view_shape(patch_size, window_factor)), np.uint8) for _ in factors]
    if k:
        with torch.inference_mode():
            for col, (img, xy, size, ang) in enumerate(
                ((src, a_xy, a_size, a_angle), (dst, d_xy, d_size, d_angle))
            ):
                t = torch.from_numpy(img)
                pyr = build_pyramid(t)
                for cut, factor in zip(cuts, factors, strict=True):
                    p = extract_patches(
                        t,
                        xy,
                        size,
                        ang,
                        patch_size=patch_size,
                        mr_size=mr_size,
                        window_factor=factor,
                        pyramid=pyr,
                    )
                    cut[:, col] = patches_to_uint8(p)
    f32 = np.float32
    return PhotoPairs(
        cuts[0],
        a_xy.astype(f32),
        a_size.astype(f32),
        a_angle.astype(f32),
        np.asarray(d_xy, f32),
        np.asarray(d_size, f32),
        np.asarray(d_angle, f32),
        h,
        mode,
        cuts[1] if surround else None,
    )


def load_photo(path: str | Path, max_side: int = 640) -> np.ndarray:
    """A photo as gray float32 in [0,1], downscaled so its longer side is <= ``max_side``."""
    return resize_max(read_image(path), max_side)[0]
