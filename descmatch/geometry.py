"""Plane-to-plane geometry shared by training and evaluation: points, local Jacobians and
keypoint frames seen through a homography."""

from __future__ import annotations

import numpy as np


def project(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map points (float64). Shape: h (3,3), xy (N,2) -> (N,2)."""
    return apply_homography(h, xy)[0]


def apply_homography(h: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map points; also returns the homogeneous w (> 0 in front). Shape: (N,2) -> (N,2), (N,)."""
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    p = xy @ h[:, :2].T + h[:, 2]
    w = p[:, 2]
    safe = np.where(np.abs(w) < 1e-12, 1e-12, w)
    return p[:, :2] / safe[:, None], w


def homography_jacobian(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Jacobian of the mapping at each point: ``J[n] = d H(x) / d x``. Shape: (N,2) -> (N,2,2)."""
    uv, w = apply_homography(h, xy)
    w = np.where(np.abs(w) < 1e-12, 1e-12, w)
    j = np.empty((len(uv), 2, 2))
    for r in range(2):
        j[:, r, 0] = (h[r, 0] - uv[:, r] * h[2, 0]) / w
        j[:, r, 1] = (h[r, 1] - uv[:, r] * h[2, 1]) / w
    return j


def map_keypoints(
    h: np.ndarray, xy: np.ndarray, size: np.ndarray, angle: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints seen through ``h``: position, size times the local scale, orientation mapped
    as a gradient direction by the local Jacobian's inverse transpose (OpenCV degrees, y down).
    Also returns "in front" (w > 0).

    Shape: xy (N,2), size, angle (N,) -> xy (N,2), size (N,), angle (N,) float32, front (N,) bool.
    """
    uv, w = apply_homography(h, xy)
    j = homography_jacobian(h, xy)
    det = np.linalg.det(j)
    scale = np.sqrt(np.abs(det))
    t = np.deg2rad(np.asarray(angle, np.float64))
    # The orientation is a dominant gradient direction, and gradients map by J^-T (the same
    # direction as J for a similarity; under foreshortening J would turn it the wrong way).
    # J^-T = adj(J)^T / det: the adjugate gives the direction, det's sign the sense.
    adj_t = np.stack(
        [np.stack([j[:, 1, 1], -j[:, 1, 0]], 1), np.stack([-j[:, 0, 1], j[:, 0, 0]], 1)], 1
    )
    d = np.einsum("nij,nj->ni", adj_t, np.stack([np.cos(t), np.sin(t)], 1))
    d *= np.sign(np.where(det == 0, 1.0, det))[:, None]
    ang = np.rad2deg(np.arctan2(d[:, 1], d[:, 0])) % 360.0
    return (
        uv.astype(np.float32),
        (np.asarray(size) * scale).astype(np.float32),
        ang.astype(np.float32),
        w > 0,
    )
