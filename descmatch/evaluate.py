"""Evaluation on image pairs with ground truth: homographies (HPatches) and cameras."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree

from .errors import InputError
from .geometry import map_keypoints, project  # noqa: F401  (project: part of this API)

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


@dataclass
class PairScore:
    matches: int
    correct: dict[int, int]

    def mma(self, t: int) -> float:
        return self.correct[t] / self.matches if self.matches else 0.0


def score_homography(
    kp0: np.ndarray,
    kp1: np.ndarray,
    matches0: np.ndarray,
    h: np.ndarray,
    thresholds: tuple[int, ...] = THRESHOLDS,
) -> PairScore:
    """Count matches whose image-0 keypoint maps within t px of its match under ``h``."""
    valid = matches0 >= 0
    i0 = np.nonzero(valid)[0]
    i1 = matches0[valid]
    err = np.linalg.norm(project(h, kp0[i0]) - kp1[i1], axis=1)
    return PairScore(len(i0), {t: int((err <= t).sum()) for t in thresholds})


#: Frames (orientation, size) of two keypoints agree when the mapped orientation is within
#: this many degrees and the mapped size within this ratio (``framed@3``).
FRAME_ANGLE, FRAME_SCALE = 30.0, 1.5


def possible_correspondences(
    kp0: np.ndarray,
    kp1: np.ndarray,
    h: np.ndarray,
    threshold: float = 3.0,
    frames: tuple[np.ndarray, ...] | None = None,
) -> int:
    """The most one-to-one matches that can be correct at ``threshold`` px with these
    keypoints: a maximum bipartite matching between image-0 keypoints (mapped by ``h``) and
    image-1 keypoints within the threshold. No descriptor can find more mutual matches
    correct at that threshold, so correct/possible says how close a descriptor is to the
    detector's ceiling.

    ``frames`` = (size0, angle0, size1, angle1) also requires the frames to agree: the
    image-0 orientation mapped as a gradient (:func:`~descmatch.geometry.map_keypoints`)
    within :data:`FRAME_ANGLE` degrees and the mapped size within :data:`FRAME_SCALE` x of the
    image-1 keypoint's. Patches cut in disagreeing frames show the point rotated or scaled,
    so this is the ceiling of a descriptor of oriented patches that is not invariant beyond.

    Shape: kp0 (N0,2), kp1 (N1,2); frames (N0,), (N0,), (N1,), (N1,)."""
    if len(kp0) == 0 or len(kp1) == 0:
        return 0
    p0 = project(h, kp0)
    finite = np.flatnonzero(np.isfinite(p0).all(1))
    # Every (image-0, image-1) keypoint pair within the threshold, as a sparse distance matrix.
    near = cKDTree(p0[finite]).sparse_distance_matrix(
        cKDTree(kp1), threshold, output_type="coo_matrix"
    )
    i, j = finite[near.row], near.col
    if frames is not None:
        size0, angle0, size1, angle1 = (np.asarray(f, np.float64) for f in frames)
        _, m_size, m_angle, _ = map_keypoints(h, kp0, size0, angle0)
        da = np.abs((angle1[j] - m_angle[i] + 180.0) % 360.0 - 180.0)
        ok = (da <= FRAME_ANGLE) & (np.abs(np.log(size1[j] / m_size[i])) <= math.log(FRAME_SCALE))
        i, j = i[ok], j[ok]
    graph = csr_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(kp0), len(kp1)))
    return int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())


def homography_corner_error(
    h_est: np.ndarray | None, h_true: np.ndarray, width: int, height: int
) -> float:
    """Mean distance of the image corners mapped by the estimate and the truth."""
    if h_est is None:
        return float("inf")
    c = np.array([[0, 0], [width - 1, 0], [0, height - 1], [width - 1, height - 1]], float)
    return float(np.linalg.norm(project(h_est, c) - project(h_true, c), axis=1).mean())


@dataclass
class HomographyRow:
    """One pair 1-i of a sequence."""

    sequence: str
    pair: str
    matches: int
    correct: dict[int, int]
    corner_error: float
    possible: int = 0  # the most matches these keypoints allow correct at 3 px
    framed: int = 0  # ... of keypoints whose frames also agree (possible_correspondences)

    def mma(self, t: int) -> float:
        return self.correct[t] / self.matches if self.matches else 0.0


def _sequence_images(seq: Path) -> list[Path]:
    from .images import is_image

    files = {p.stem: p for p in seq.iterdir() if p.is_file() and is_image(p)}
    if "1" not in files:
        raise InputError(f"{seq}: not an HPatches-style sequence (no image 1.*)")
    out = []
    for i in range(1, 100):
        if str(i) not in files:
            break
        out.append(files[str(i)])
    return out


def evaluate_homography(
    seq: str | Path,
    describer: Any,
    detector: Any,
    ratio: float | None = None,
    mutual: bool = True,
    device: Any = "cpu",
) -> list[HomographyRow]:
    """Match image 1 of an HPatches-style sequence to each image i with ``H_1_i`` and score
    the matches (1/2/3/5/10 px) and a RANSAC homography's corner error."""
    import torch

    from .export.viz import verify
    from .images import read_image
    from .match import match_descriptors

    seq = Path(seq)
    if not seq.is_dir():
        raise InputError(f"{seq}: no such sequence folder")
    paths = _sequence_images(seq)
    feats = []
    for p in paths:
        img = read_image(p)
        kps = detector(img)
        feats.append((img.shape, kps, torch.from_numpy(describer(img, kps)).to(device)))
    rows = []
    (h0, w0), k0, d0 = feats[0]
    for i in range(1, len(paths)):
        hfile = seq / f"H_1_{i + 1}"
        h_true = read_homography(hfile)
        _, k1, d1 = feats[i]
        m, _ = match_descriptors(d0, d1, ratio, mutual)
        m_np = m.cpu().numpy()
        s = score_homography(k0.xy, k1.xy, m_np, h_true)
        i0 = np.nonzero(m_np >= 0)[0]
        h_est, _ = verify(k0.xy[i0], k1.xy[m_np[i0]], "homography")
        err = homography_corner_error(h_est, h_true, w0, h0)
        rows.append(
            HomographyRow(
                seq.name,
                f"1-{i + 1}",
                s.matches,
                s.correct,
                err,
                possible_correspondences(k0.xy, k1.xy, h_true, 3.0),
                possible_correspondences(
                    k0.xy, k1.xy, h_true, 3.0, (k0.size, k0.angle, k1.size, k1.angle)
                ),
            )
        )
    return rows


@dataclass
class EpipolarRow:
    """One image pair of a scene with known cameras."""

    scene: str
    pair: str
    matches: int
    correct: int  # symmetric epipolar distance under the threshold


def evaluate_epipolar(
    scene: str | Path,
    describer: Any,
    detector: Any,
    ratio: float | None = None,
    mutual: bool = True,
    device: Any = "cpu",
    threshold: float = 2.0,
    step: int = 1,
) -> list[EpipolarRow]:
    """Match consecutive images (i, i+step) of a scene with ``cameras.txt`` and count the
    matches within ``threshold`` px of their epipolar lines under the true cameras."""
    import torch

    from .cameras import epipolar_distance, fundamental_matrix, read_cameras
    from .images import read_image
    from .match import match_descriptors

    scene = Path(scene)
    cam_file = scene / "cameras.txt"
    if not cam_file.is_file():
        raise InputError(f"{scene}: no cameras.txt")
    cams = read_cameras(cam_file)
    img_dir = scene / "images" if (scene / "images").is_dir() else scene
    names = sorted(cams)
    feats = {}
    for n in names:
        path = img_dir / n
        if not path.is_file():
            raise InputError(f"{cam_file}: image {n} is not in {img_dir}")
        img = read_image(path)
        kps = detector(img)
        feats[n] = (kps, torch.from_numpy(describer(img, kps)).to(device))
    rows = []
    for i in range(len(names) - step):
        a, b = names[i], names[i + step]
        (k0, d0), (k1, d1) = feats[a], feats[b]
        m, _ = match_descriptors(d0, d1, ratio, mutual)
        m_np = m.cpu().numpy()
        i0 = np.nonzero(m_np >= 0)[0]
        f = fundamental_matrix(cams[a], cams[b])
        err = epipolar_distance(f, k0.xy[i0], k1.xy[m_np[i0]])
        rows.append(EpipolarRow(scene.name, f"{a}-{b}", len(i0), int((err < threshold).sum())))
    return rows


@dataclass
class PoseError:
    """Relative pose error of one image pair: the angle of the rotation between the
    estimated and the true relative rotation, and the angle between the estimated and the
    true relative translation directions (degrees)."""

    pair: str
    rotation_deg: float
    translation_deg: float


def _rotation_angle_deg(r: np.ndarray) -> float:
    """Angle of a rotation matrix, accurate near 0 (atan2 of the sine and cosine parts)."""
    sin = 0.5 * np.linalg.norm([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    cos = 0.5 * (np.trace(r) - 1.0)
    return float(np.degrees(np.arctan2(sin, cos)))


def _vector_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two vectors (nan for a zero vector), accurate near 0."""
    if np.linalg.norm(a) == 0 or np.linalg.norm(b) == 0:
        return float("nan")
    return float(np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b)), float(a @ b))))


def relative_pose_errors(
    estimated: dict[str, tuple[np.ndarray, np.ndarray]],
    truth: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[PoseError]:
    """Relative pose errors of all pairs of images that have both an estimated and a true
    pose, each pose a world-to-camera ``(R, t)`` (``x_cam = R X + t``). Independent of the
    reconstruction's frame and scale: the relative pose of cameras i, j is
    ``R_ij = R_j R_i^T``, ``t_ij = t_j - R_ij t_i``, and its translation is compared by
    direction only. Shape: R (3,3), t (3,)."""
    names = sorted(n for n in estimated if n in truth)
    out = []
    for k, a in enumerate(names):
        for b in names[k + 1 :]:
            rel = []
            for poses in (estimated, truth):
                (ra, ta), (rb, tb) = poses[a], poses[b]
                ra, rb = np.asarray(ra, np.float64), np.asarray(rb, np.float64)
                r = rb @ ra.T
                t = np.asarray(tb, np.float64) - r @ np.asarray(ta, np.float64)
                rel.append((r, t))
            (re, te), (rt, tt) = rel
            out.append(
                PoseError(f"{a}-{b}", _rotation_angle_deg(re.T @ rt), _vector_angle_deg(te, tt))
            )
    return out


@dataclass
class PoseErrorSummary:
    """Median and mean relative pose errors over image pairs (degrees), and the share of
    pairs whose rotation and translation errors are both under 5 degrees."""

    pairs: int
    cameras: int  # cameras with a true pose
    registered: int  # of those, cameras with an estimated pose
    rotation_median: float
    rotation_mean: float
    translation_median: float
    translation_mean: float
    within_5deg: float
    rows: list[PoseError]


def summarize_pose_errors(
    errors: list[PoseError], cameras: int = 0, registered: int = 0
) -> PoseErrorSummary:
    """Summarise ``relative_pose_errors``; ``cameras``: how many true poses there are,
    ``registered``: how many of them were estimated."""
    r = np.array([e.rotation_deg for e in errors], np.float64)
    t = np.array([e.translation_deg for e in errors], np.float64)
    if not len(r):
        nan = float("nan")
        return PoseErrorSummary(0, cameras, registered, nan, nan, nan, nan, 0.0, errors)
    ok = float(np.mean((r < 5) & (t < 5)))
    return PoseErrorSummary(
        len(r),
        cameras,
        registered,
        float(np.median(r)),
        float(r.mean()),
        float(np.nanmedian(t)),
        float(np.nanmean(t)),
        ok,
        errors,
    )
