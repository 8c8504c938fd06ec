"""A tiny synthetic dataset in the Brown/PhotoTour format, for tests.

Each 3D point gets a random smooth texture (blurred noise plus a few shapes); its patches are
that texture under a small random rotation, scale, shift, brightness change and noise.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import cv2
import numpy as np

PATCH = 64
GRID = 16
PER_FILE = GRID * GRID


def _texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """A smooth random texture in [0, 1]. Shape: -> (side, side) float32."""
    noise = rng.normal(size=(side, side)).astype(np.float32)
    tex = cv2.GaussianBlur(noise, (0, 0), sigmaX=float(rng.uniform(2.5, 4.0)))
    tex = (tex - tex.min()) / (np.ptp(tex) + 1e-6)
    for _ in range(int(rng.integers(2, 5))):
        color = float(rng.uniform(0.0, 1.0))
        center = tuple(int(v) for v in rng.integers(side // 4, 3 * side // 4, size=2))
        if rng.random() < 0.5:
            cv2.circle(tex, center, int(rng.integers(5, 14)), color, thickness=-1)
        else:
            half = rng.integers(4, 12, size=2)
            p0 = (center[0] - int(half[0]), center[1] - int(half[1]))
            p1 = (center[0] + int(half[0]), center[1] + int(half[1]))
            cv2.rectangle(tex, p0, p1, color, thickness=-1)
    return cv2.GaussianBlur(tex, (0, 0), sigmaX=1.0)


def _view(rng: np.random.Generator, tex: np.ndarray) -> np.ndarray:
    """One patch of a texture under a small random change. Shape: (T, T) -> (64, 64) uint8."""
    side = tex.shape[0]
    angle = float(rng.uniform(-10.0, 10.0))
    scale = float(rng.uniform(0.92, 1.08))
    rot = cv2.getRotationMatrix2D((side / 2.0, side / 2.0), angle, scale)
    # Shift so the patch centre lands at the texture centre, plus a pixel or two of jitter.
    off = (side - PATCH) / 2.0
    rot[:, 2] -= off - rng.uniform(-1.5, 1.5, size=2)
    warped = cv2.warpAffine(
        tex, rot, (PATCH, PATCH), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
    )
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08)
    img = warped * gain + bias + rng.normal(scale=0.02, size=warped.shape)
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def brown_fixture_patches(
    n_points: int = 40, per_point: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The patches and point ids ``make_brown_fixture`` writes for these arguments.

    Patches of one point are consecutive, as in the real datasets.
    Shape: -> patches (n_points*per_point, 64, 64) uint8, point_ids (n_points*per_point,) int64.
    """
    rng = np.random.default_rng(seed)
    patches = np.empty((n_points * per_point, PATCH, PATCH), dtype=np.uint8)
    for p in range(n_points):
        tex = _texture(rng, PATCH + 32)
        for j in range(per_point):
            patches[p * per_point + j] = _view(rng, tex)
    point_ids = np.repeat(np.arange(n_points, dtype=np.int64), per_point)
    return patches, point_ids


def brown_fixture_pairs(point_ids: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A balanced, shuffled set of pairs: every same-point pair, and as many random
    different-point pairs. Shape: -> idx (L, 2) int64, is_match (L,) bool."""
    rng = np.random.default_rng(seed + 1)
    by_point: dict[int, list[int]] = {}
    for i, pid in enumerate(point_ids.tolist()):
        by_point.setdefault(pid, []).append(i)
    pos = [pair for idx in by_point.values() for pair in combinations(idx, 2)]
    neg: list[tuple[int, int]] = []
    while len(neg) < len(pos):
        i, j = (int(v) for v in rng.integers(0, len(point_ids), size=2))
        if point_ids[i] != point_ids[j]:
            neg.append((i, j))
    idx = np.array(pos + neg, dtype=np.int64).reshape(-1, 2)
    is_match = np.arange(len(idx)) < len(pos)
    order = rng.permutation(len(idx))
    return idx[order], is_match[order]


def write_pairs_file(path: Path, idx: np.ndarray, point_ids: np.ndarray) -> Path:
    """Write pairs as an m50 file: ``patchID1 pointID1 0 patchID2 pointID2 0 0`` per line."""
    lines = [f"{i} {point_ids[i]} 0 {j} {point_ids[j]} 0 0" for i, j in idx.tolist()]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_brown_fixture(root: Path, n_points: int = 40, per_point: int = 3, seed: int = 0) -> Path:
    """Write a valid Brown-format dataset into ``root`` (created) and return ``root``.

    Writes info.txt, the bmp grids (the last one zero-filled past the last patch) and an
    ``m50_LLLLL_LLLLL_0.txt`` file with a balanced set of L matching and non-matching pairs.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    patches, point_ids = brown_fixture_patches(n_points, per_point, seed)
    (root / "info.txt").write_text("".join(f"{pid} 0\n" for pid in point_ids.tolist()))
    num_files = -(-len(patches) // PER_FILE)
    for f in range(num_files):
        chunk = patches[f * PER_FILE : (f + 1) * PER_FILE]
        full = np.zeros((PER_FILE, PATCH, PATCH), dtype=np.uint8)
        full[: len(chunk)] = chunk
        grid = full.reshape(GRID, GRID, PATCH, PATCH).transpose(0, 2, 1, 3)
        img = np.ascontiguousarray(grid.reshape(GRID * PATCH, GRID * PATCH))
        if not cv2.imwrite(str(root / f"patch{f:04d}.bmp"), img):
            raise OSError(f"cannot write {root / f'patch{f:04d}.bmp'}")
    idx, _ = brown_fixture_pairs(point_ids, seed)
    write_pairs_file(root / f"m50_{len(idx):05d}_{len(idx):05d}_0.txt", idx, point_ids)
    return root
