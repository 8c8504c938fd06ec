"""Pinhole cameras in the ``cameras.txt`` format of Strecha-style multi-view scenes: one
line per image, ``name width height fx fy cx cy r11 r12 r13 r21 r22 r23 r31 r32 r33 tx ty
tz``, world to camera ``x_cam = R X + t``, pixel centres at integers; plus the epipolar
geometry between two of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

_CAMERA_FIELDS = 19


@dataclass(frozen=True)
class Camera:
    """A pinhole camera: ``x ~ K (R X + t)``, pixel centres at integers.

    Shape: K, R (3,3); t (3,) float64.
    """

    name: str
    width: int
    height: int
    K: np.ndarray
    R: np.ndarray
    t: np.ndarray

    @property
    def P(self) -> np.ndarray:
        """Projection matrix ``K [R | t]``. Shape: (3,4)."""
        return self.K @ np.hstack([self.R, self.t[:, None]])

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates, ``-R^T t``. Shape: (3,)."""
        return -self.R.T @ self.t

    @property
    def axis(self) -> np.ndarray:
        """Viewing direction (optical axis) in world coordinates. Shape: (3,)."""
        return self.R[2].copy()

    def scaled(self, sx: float, sy: float) -> Camera:
        """The camera of the image resized by (sx, sy): ``x' = (x + 0.5) s - 0.5``."""
        s = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])
        return Camera(
            self.name,
            max(1, round(self.width * sx)),
            max(1, round(self.height * sy)),
            s @ self.K,
            self.R,
            self.t,
        )

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel positions and depths of world points. Shape: (N,3) -> (N,2), (N,)."""
        cam = np.asarray(xyz, np.float64) @ self.R.T + self.t
        z = cam[:, 2]
        pix = cam @ self.K.T
        with np.errstate(divide="ignore", invalid="ignore"):
            return pix[:, :2] / pix[:, 2:3], z


def read_cameras(path: str | Path) -> dict[str, Camera]:
    """Read a ``cameras.txt``: one camera a line, ``name width height fx fy cx cy r11 r12 r13
    r21 r22 r23 r31 r32 r33 tx ty tz``; blank lines and ``#`` comments are skipped. Raises
    InputError naming ``file:line`` for a malformed line (field count, numbers, sizes, focal
    lengths, a rotation that is not one, a repeated name)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file") from None
    cams: dict[str, Camera] = {}
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        parts = line.split()
        if len(parts) != _CAMERA_FIELDS:
            raise InputError(
                f"{where}: expected {_CAMERA_FIELDS} fields (name width height fx "
                f"fy cx cy r11..r33 tx ty tz), got {len(parts)}"
            )
        name = parts[0]
        try:
            vals = np.array([float(v) for v in parts[1:]], np.float64)
        except ValueError:
            bad = next(v for v in parts[1:] if not _is_float(v))
            raise InputError(f"{where}: {bad!r} is not a number") from None
        if not np.isfinite(vals).all():
            raise InputError(f"{where}: non-finite number")
        w, h = vals[0], vals[1]
        if w != round(w) or h != round(h) or w < 1 or h < 1:
            raise InputError(
                f"{where}: width and height must be positive integers, got {parts[1]} {parts[2]}"
            )
        fx, fy, cx, cy = vals[2:6]
        if fx <= 0 or fy <= 0:
            raise InputError(f"{where}: focal lengths must be > 0, got {fx:g} {fy:g}")
        r = vals[6:15].reshape(3, 3)
        if np.abs(r @ r.T - np.eye(3)).max() > 1e-3 or np.linalg.det(r) <= 0:
            raise InputError(f"{where}: r11..r33 is not a rotation matrix")
        if name in cams:
            raise InputError(f"{where}: camera {name!r} is given twice")
        k = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
        cams[name] = Camera(name, int(w), int(h), k, r, vals[15:18].copy())
    if not cams:
        raise InputError(f"{path}: no cameras")
    return cams


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def fundamental_matrix(cam0: Camera, cam1: Camera) -> np.ndarray:
    """F with ``x1^T F x0 = 0`` for pixels x0 of cam0 and x1 of cam1. Shape: (3,3)."""
    r = cam1.R @ cam0.R.T
    t = cam1.t - r @ cam0.t
    tx = np.array([[0.0, -t[2], t[1]], [t[2], 0.0, -t[0]], [-t[1], t[0], 0.0]])
    return np.linalg.inv(cam1.K).T @ tx @ r @ np.linalg.inv(cam0.K)


def epipolar_distance(f: np.ndarray, xy0: np.ndarray, xy1: np.ndarray) -> np.ndarray:
    """Symmetric epipolar distance: the larger of the two point-to-epipolar-line distances
    (x1 to ``F x0`` in image 1, x0 to ``F^T x1`` in image 0), in pixels.
    Shape: (N,2), (N,2) -> (N,)."""
    h0 = np.hstack([np.asarray(xy0, np.float64), np.ones((len(xy0), 1))])
    h1 = np.hstack([np.asarray(xy1, np.float64), np.ones((len(xy1), 1))])
    l1 = h0 @ f.T  # lines in image 1
    l0 = h1 @ f  # lines in image 0
    alg = np.abs((h1 * l1).sum(1))
    d1 = alg / np.maximum(np.hypot(l1[:, 0], l1[:, 1]), 1e-12)
    d0 = alg / np.maximum(np.hypot(l0[:, 0], l0[:, 1]), 1e-12)
    return np.maximum(d0, d1)
