"""Evaluation on image pairs with ground truth: homographies (HPatches) and cameras."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

THRESHOLDS = (1, 2, 3, 5, 10)


def read_homography(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        h = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError):
        raise InputError(f"{path}: not a readable 3x3 homography") from None
    if h.shape != (3, 3):
        raise InputError(f"{path}: expected 3x3 numbers, got shape {h.shape}")
    return h


def project(h: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Shape: h (3,3), xy (N,2) -> (N,2)."""
    p = np.concatenate([xy.astype(np.float64), np.ones((len(xy), 1))], 1) @ h.T
    return p[:, :2] / p[:, 2:3]


@dataclass
class PairScore:
    matches: int
    correct: dict[int, int]

    def mma(self, t: int) -> float:
        return self.correct[t] / self.matches if self.matches else 0.0


def score_homography(kp0: np.ndarray, kp1: np.ndarray, matches0: np.ndarray,
                     h: np.ndarray, thresholds: tuple[int, ...] = THRESHOLDS) -> PairScore:
    """Count matches whose image-0 keypoint maps within t px of its match under ``h``."""
    valid = matches0 >= 0
    i0 = np.nonzero(valid)[0]
    i1 = matches0[valid]
    err = np.linalg.norm(project(h, kp0[i0]) - kp1[i1], axis=1)
    return PairScore(len(i0), {t: int((err <= t).sum()) for t in thresholds})


def homography_corner_error(h_est: np.ndarray | None, h_true: np.ndarray,
                            width: int, height: int) -> float:
    """Mean distance of the image corners mapped by the estimate and the truth."""
    if h_est is None:
        return float("inf")
    c = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], float)
    return float(np.linalg.norm(project(h_est, c) - project(h_true, c), axis=1).mean())
