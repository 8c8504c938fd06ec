"""Two images in, matches out: the pipeline behind ``descmatch match A.jpg B.jpg``.

Both images are read, detected and described with the same detector and describer,
matched by mutual nearest neighbours (and the ratio test), and RANSAC separates inliers.
Nothing is written unless the caller asks for a picture.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .describe import Describer
from .detect import Detector, Keypoints
from .errors import InputError
from .export.viz import draw_matches, verify, write_image
from .images import DEFAULT_MAX_PIXELS, read_scaled
from .match import DEFAULT_RATIO, match_descriptors


@dataclass
class TwoViewMatches:
    """The matches of two images.

    Shape: keypoints0/1 hold N0/N1 keypoints (in original pixels); matches (M,2) int64
    indices into them; inliers (M,) bool; model (3,3) float64 or None. ``image0/1`` are the
    images as read (gray float32, downscaled by ``scale0/1`` (x, y) under ``resize_max`` or
    ``max_pixels``).
    """

    image0: np.ndarray
    image1: np.ndarray
    scale0: tuple[float, float]
    scale1: tuple[float, float]
    keypoints0: Keypoints
    keypoints1: Keypoints
    matches: np.ndarray
    inliers: np.ndarray
    model: np.ndarray | None
    geometry: str
    describer: str
    seconds: float

    @property
    def xy0(self) -> np.ndarray:
        """Shape: (M,2) float32, matched points of the first image."""
        return self.keypoints0.xy[self.matches[:, 0]]

    @property
    def xy1(self) -> np.ndarray:
        """Shape: (M,2) float32, matched points of the second image."""
        return self.keypoints1.xy[self.matches[:, 1]]

    def draw(self, path: str | Path) -> Path:
        """Write a side-by-side picture of the matches (inliers green, outliers red)."""
        xy0 = (self.xy0 + 0.5) * np.array(self.scale0, np.float32) - 0.5
        xy1 = (self.xy1 + 0.5) * np.array(self.scale1, np.float32) - 0.5
        return write_image(path, draw_matches(self.image0, self.image1, xy0, xy1, self.inliers))


def _features(
    path: Path,
    detector: Detector,
    describer: Describer,
    max_side: int | None,
    max_pixels: int | None,
) -> tuple[np.ndarray, tuple[float, float], Keypoints, np.ndarray]:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    read = read_scaled(path, max_side, max_pixels)
    kps = detector(read.image)
    desc = describer(read.image, kps)
    sx, sy = read.scale
    if (sx, sy) != (1.0, 1.0):
        kps = kps.scaled(1.0 / sx, 1.0 / sy)
    return read.image, read.scale, kps, desc


def match_images(
    image0: str | Path,
    image1: str | Path,
    detector: Detector,
    describer: Describer,
    ratio: float | None = DEFAULT_RATIO,
    mutual: bool = True,
    geometry: str = "fundamental",
    device: torch.device | None = None,
    resize_max: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> TwoViewMatches:
    """Detect, describe and match two images, then separate inliers with RANSAC.

    ``ratio`` None (or >= 1) disables Lowe's ratio test; ``geometry`` is ``fundamental`` or
    ``homography``; ``resize_max`` downscales before detection and images above
    ``max_pixels`` are read smaller (keypoints are returned in original pixels).
    """
    t0 = time.perf_counter()
    dev = device if device is not None else torch.device("cpu")
    im0, s0, k0, d0 = _features(Path(image0), detector, describer, resize_max, max_pixels)
    im1, s1, k1, d1 = _features(Path(image1), detector, describer, resize_max, max_pixels)
    ratio_v = None if ratio is None or ratio >= 1.0 else ratio
    m, _ = match_descriptors(
        torch.from_numpy(d0).to(dev), torch.from_numpy(d1).to(dev), ratio_v, mutual
    )
    m_np = m.cpu().numpy()
    i0 = (m_np >= 0).nonzero()[0]
    pairs = np.stack([i0, m_np[i0]], 1).astype(np.int64).reshape(-1, 2)
    model, inliers = verify(k0.xy[pairs[:, 0]], k1.xy[pairs[:, 1]], geometry)
    return TwoViewMatches(
        im0,
        im1,
        s0,
        s1,
        k0,
        k1,
        pairs,
        inliers,
        model,
        geometry,
        describer.name,
        time.perf_counter() - t0,
    )
