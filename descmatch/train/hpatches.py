"""Training pairs from real image pairs related by a known homography (HPatches-style folders).

A sequence folder holds images ``1.*`` .. ``N.*`` and the homographies ``H_1_i`` (3x3 text,
image-1 pixels -> image-i pixels), as :func:`descmatch.evaluate.evaluate_homography` reads
them; ``hpatches:PATH`` names one sequence or a folder of sequences. For every pair ``(1, i)``:

1. DoG keypoints (:class:`~descmatch.detect.SiftDetector`, near-duplicates dropped) of image 1
   and of image i (each image detected once);
2. the image-1 keypoints mapped by ``H_1_i`` (position, size by the local scale, orientation
   as a gradient, by the local Jacobian's inverse transpose:
   :func:`~descmatch.train.photos.map_keypoints`) and paired one to one
   with detected image-i keypoints by the rules of the photos kind's detected pairing
   (:func:`~descmatch.train.photos._pair_detected`: within ``max_pair_px`` = 2 px, size within
   ``max_size_ratio`` = 1.2, orientation within ``max_angle_diff``), keeping the keypoints whose
   windows lie inside both images (the image-i window also mapped back into image 1);
3. at most ``pairs_per_image`` pairs, drawn with ``default_rng([seed, sequence, i])``.

The patches are cut as the describers cut them (:func:`~descmatch.patches.extract_patches`, one
batched call per image: image 1 once for all its pairs). Every pair is its own point; the pairs
of one image pair are one group (hard negatives for same-image batches). The pool has the
format :class:`~descmatch.train.pool.PairPool` loads; it is built one sequence per part,
resumably, like the photos pool.

Note: HPatches is also an evaluation benchmark; train on sequences you do not evaluate on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..detect import Keypoints, SiftDetector
from ..errors import ConfigError, ImageReadError, InputError
from ..evaluate import _sequence_images, read_homography
from ..images import is_image, read_image
from ..patches import DEFAULT_MR_SIZE, build_pyramid, extract_patches, patches_to_uint8
from .photos import (
    PhotoPairConfig,
    _dedupe,
    _inside,
    _pair_detected,
    _window_corners,
    apply_homography,
    map_keypoints,
)
from .pool import META_FILE, POOL_FORMAT, POOL_VERSION
from .poolbuild import assemble_parts, part_done, read_parts, start_pool_build, write_part

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def is_sequence(path: str | Path) -> bool:
    """Whether ``path`` is an HPatches-style sequence (an image ``1.*`` and ``H_1_2``)."""
    p = Path(path)
    return (p / "H_1_2").is_file() and any(
        f.stem == "1" and is_image(f) for f in p.iterdir() if f.is_file()
    )


def find_sequences(path: str | Path) -> list[Path]:
    """``path`` itself when it is a sequence, else its sequence subfolders, sorted."""
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: no such HPatches folder")
    if is_sequence(p):
        return [p]
    seqs = sorted(d for d in p.iterdir() if d.is_dir() and is_sequence(d))
    if not seqs:
        raise InputError(
            f"{p}: neither an HPatches-style sequence (images 1..N and H_1_i) nor "
            "a folder of such sequences"
        )
    return seqs


@dataclass
class HomographyPairs:
    """Pairs of one image pair (1, i): indices of the paired keypoints.

    Shape: idx1 (K,) into image 1's keypoints, idx_i (K,) into image i's, sorted by idx1.
    """

    idx1: np.ndarray
    idx_i: np.ndarray

    def __len__(self) -> int:
        return int(len(self.idx1))


def detect(image: np.ndarray, detector: SiftDetector) -> Keypoints:
    """DoG keypoints without near-duplicates (as the photos kind keeps them)."""
    kp = detector(image)
    return kp.select(_dedupe(kp.xy, kp.size, kp.angle))


def homography_pairs(
    kp1: Keypoints,
    shape1: tuple[int, int],
    kpi: Keypoints,
    shape_i: tuple[int, int],
    h: np.ndarray,
    rng: np.random.Generator,
    conf: PhotoPairConfig = PhotoPairConfig(),
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: float = 1.0,
    max_pairs: int = 512,
) -> HomographyPairs:
    """Pair image-1 keypoints mapped by ``h`` with detected image-i keypoints (the photos
    kind's detected-pairing rules), windows inside both images, at most ``max_pairs`` drawn
    from ``rng``. Shapes: image shapes (H,W); h (3,3) image 1 -> image i."""
    (h1, w1), (hi, wi) = shape1, shape_i
    win = mr_size * window_factor
    h_inv = np.linalg.inv(h)
    m_xy, m_size, m_angle, front = map_keypoints(h, kp1.xy, kp1.size, kp1.angle)
    src_ok = _inside(_window_corners(kp1.xy, kp1.size, kp1.angle, win), w1, h1, conf.margin)
    dst_in = _inside(_window_corners(m_xy, m_size, m_angle, win), wi, hi, conf.margin)
    cand = np.flatnonzero(front & src_ok & dst_in)
    # Image-i windows: inside image i, and mapped back, inside image 1 (in front).
    corners = _window_corners(kpi.xy, kpi.size, kpi.angle, win)
    back, w = apply_homography(h_inv, corners.reshape(-1, 2))
    ok_i = (
        _inside(corners, wi, hi, conf.margin)
        & _inside(back.reshape(-1, 4, 2), w1, h1, conf.margin)
        & (w.reshape(-1, 4) > 0).all(1)
    )
    valid_i = np.flatnonzero(ok_i)
    si, wj = _pair_detected(
        m_xy[cand],
        m_size[cand],
        m_angle[cand],
        kpi.xy[valid_i],
        kpi.size[valid_i],
        kpi.angle[valid_i],
        conf,
    )
    idx1, idx_i = cand[si], valid_i[wj]
    if len(idx1) > max_pairs:
        pick = np.sort(rng.choice(len(idx1), size=max_pairs, replace=False))
        idx1, idx_i = idx1[pick], idx_i[pick]
    return HomographyPairs(idx1.astype(np.int64), idx_i.astype(np.int64))


def _cut(
    image: np.ndarray,
    kp: Keypoints,
    idx: np.ndarray,
    patch_size: int,
    mr_size: float,
    window_factor: float,
) -> np.ndarray:
    """Patches of the keypoints ``idx`` of one image, one batched call. Shape: -> (K,P,P) uint8."""
    if len(idx) == 0:
        return np.zeros((0, patch_size, patch_size), np.uint8)
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        p = extract_patches(
            t,
            kp.xy[idx],
            kp.size[idx],
            kp.angle[idx],
            patch_size=patch_size,
            mr_size=mr_size,
            window_factor=window_factor,
            pyramid=build_pyramid(t),
        )
        return patches_to_uint8(p)


def sequence_pairs(
    seq: str | Path,
    index: int,
    seed: int,
    conf: PhotoPairConfig,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: float = 1.0,
    max_pairs: int = 512,
    detector: SiftDetector | None = None,
) -> list[tuple[str, np.ndarray]]:
    """The patch pairs of every image pair (1, i) of a sequence (``index``: its number, for the
    random streams). Shape: -> [(name "SEQ/1-i", (K,2,P,P) uint8)], i = 2..N."""
    seq = Path(seq)
    det = detector if detector is not None else SiftDetector(max_keypoints=conf.max_keypoints)
    paths = _sequence_images(seq)
    if len(paths) < 2:
        raise InputError(f"{seq}: a sequence needs images 1 and 2 at least")
    images = [read_image(p) for p in paths]
    kps = [detect(im, det) for im in images]
    found: list[tuple[int, HomographyPairs]] = []
    for i in range(2, len(paths) + 1):
        hfile = seq / f"H_1_{i}"
        if not hfile.is_file():
            raise InputError(f"{seq}: image {paths[i - 1].name} has no {hfile.name}")
        h = read_homography(hfile)
        rng = np.random.default_rng([seed, index, i])
        found.append(
            (
                i,
                homography_pairs(
                    kps[0],
                    images[0].shape,
                    kps[i - 1],
                    images[i - 1].shape,
                    h,
                    rng,
                    conf,
                    mr_size,
                    window_factor,
                    max_pairs,
                ),
            )
        )
    # Image 1: one call for the keypoints of all its pairs; image i: one call each.
    all1 = np.concatenate([hp.idx1 for _, hp in found])
    cut1 = _cut(images[0], kps[0], all1, patch_size, mr_size, window_factor)
    out, pos = [], 0
    for i, hp in found:
        k = len(hp)
        pairs = np.empty((k, 2, patch_size, patch_size), np.uint8)
        pairs[:, 0] = cut1[pos : pos + k]
        pairs[:, 1] = _cut(images[i - 1], kps[i - 1], hp.idx_i, patch_size, mr_size, window_factor)
        pos += k
        out.append((f"{seq.name}/1-{i}", pairs))
    return out


def build_hpatches_pool(
    paths: Sequence[str | Path],
    out: str | Path,
    pairs_per_image: int = 512,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    seed: int = 0,
    progress: Progress | None = None,
    *,
    window_factor: float = 1.0,
    conf: PhotoPairConfig | None = None,
) -> Path:
    """Make the pool of the HPatches-style sequences under ``paths`` (each a sequence or a
    folder of sequences) in ``out`` and return it. ``pairs_per_image`` caps the pairs of one
    image pair. Resumable (one part per sequence); a finished pool with the same settings is
    returned as it is, one with other settings is an error."""
    out = Path(out)
    conf = conf or PhotoPairConfig()
    if pairs_per_image < 1 or patch_size < 8:
        raise ConfigError("build_hpatches_pool: pairs_per_image must be >= 1 and patch_size >= 8")
    seqs = [s for p in paths for s in find_sequences(p)]
    settings = {
        "format": POOL_FORMAT,
        "version": POOL_VERSION,
        "kind": "hpatches",
        "sources": [str(Path(p).resolve()) for p in paths],
        "sequences": [s.name for s in seqs],
        "pairs_per_image": pairs_per_image,
        "patch_size": patch_size,
        "mr_size": mr_size,
        "window_factor": window_factor,
        "seed": seed,
        "photo_conf": conf.settings(),
    }
    settings, parts = start_pool_build(out, settings)
    if parts is None:
        return out

    t0 = time.perf_counter()
    det = SiftDetector(max_keypoints=conf.max_keypoints)
    made = 0
    for c, seq in enumerate(seqs):
        if part_done(parts, c):
            continue
        try:
            groups = sequence_pairs(
                seq, c, seed, conf, patch_size, mr_size, window_factor, pairs_per_image, det
            )
            error = ""
        except (ImageReadError, InputError) as e:
            log.warning("skipped: %s", e)
            groups, error = [], str(e)
        data = (
            np.concatenate([g for _, g in groups])
            if groups
            else np.zeros((0, 2, patch_size, patch_size), np.uint8)
        )
        write_part(
            parts,
            c,
            data,
            {
                "names": [n for n, _ in groups],
                "counts": [len(g) for _, g in groups],
                "error": error,
            },
        )
        made += len(data)
        if progress:
            progress(c + 1, len(seqs), f"{seq.name}: {len(data)} pairs")
    seconds = time.perf_counter() - t0

    infos = read_parts(parts, len(seqs))
    names: list[str] = [n for info in infos for n in info["names"]]
    counts: list[int] = [n for info in infos for n in info["counts"]]
    errors: list[str] = [info["error"] for info in infos if info["error"]]
    total = int(sum(counts))
    if total == 0:
        raise InputError(f"{', '.join(map(str, paths))}: no pairs could be made")
    assemble_parts(parts, len(seqs), out, total, patch_size)
    # Groups are the image pairs that gave pairs (empty ones would only be noise in sampling).
    keep = [j for j, n in enumerate(counts) if n > 0]
    offsets = np.concatenate([[0], np.cumsum([counts[j] for j in keep])]).astype(int).tolist()
    meta = {
        **settings,
        "images": [names[j] for j in keep],
        "offsets": offsets,
        "num_pairs": total,
        "empty_image_pairs": [names[j] for j, n in enumerate(counts) if n == 0],
        "skipped": errors,
        "seconds": round(seconds, 3),
        "pairs_per_s": round(made / seconds, 1) if seconds > 0 and made else None,
    }
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    shutil.rmtree(parts, ignore_errors=True)
    return out


def build_hpatches_pool_for(
    path: str | Path,
    cache_root: str | Path,
    patch_size: int,
    mr_size: float,
    window_factor: float,
    pairs_per_image: int,
    seed: int,
    progress: Progress | None = None,
    conf: PhotoPairConfig | None = None,
) -> Path:
    """Build (or reuse) the pool of an HPatches-style folder under ``cache_root``, named by the
    folder and a digest of the settings."""
    conf = conf or PhotoPairConfig()
    key = json.dumps(
        [
            str(Path(path).resolve()),
            patch_size,
            mr_size,
            window_factor,
            pairs_per_image,
            seed,
            "hpatches",
            conf.settings(),
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out = Path(cache_root) / f"hpatches-{Path(path).resolve().name}-{patch_size}px-{digest}"
    return build_hpatches_pool(
        [path],
        out,
        pairs_per_image,
        patch_size,
        mr_size,
        seed,
        progress,
        window_factor=window_factor,
        conf=conf,
    )


__all__ = [
    "find_sequences",
    "is_sequence",
    "HomographyPairs",
    "detect",
    "homography_pairs",
    "sequence_pairs",
    "build_hpatches_pool",
    "build_hpatches_pool_for",
]
