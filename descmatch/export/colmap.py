"""Export features and matches into a COLMAP database through pycolmap (4.x).

What goes in:
- one camera per image or one for all (``camera_mode``), SIMPLE_RADIAL, principal point at
  the image centre, focal length from the EXIF 35 mm equivalent focal length when the file
  has one (a prior COLMAP keeps), else COLMAP's own guess of 1.2 x the longer side; one rig
  per camera and one frame per image, as ``colmap feature_extractor`` makes them;
- keypoints shifted by +0.5 px (COLMAP puts the centre of the top-left pixel at (0.5, 0.5),
  descmatch at (0, 0));
- optionally descriptors as 128-D uint8 (L2-normalised, x512, clipped to 255, as COLMAP's
  own SIFT), so COLMAP can match them itself; other sizes are refused;
- the raw matches of every pair, and two-view geometries: from COLMAP's geometric
  verification (RANSAC on E / F / H, ``verify=True``), or the raw matches taken as inliers.

Two database layouts (``colmap_version``): ``"3"`` (the default), the layout of COLMAP 3.x as
Linux distributions ship it (Debian and Ubuntu: 3.8, 3.9), which COLMAP 3.12 and later and
pycolmap 4 read too, adding their rig and frame tables when they open it; ``"4"``,
pycolmap 4's own layout with rigs and frames, which COLMAP 3.11 and older cannot read.

The database is built in ``DATABASE.part`` and renamed at the end, so a failed export never
leaves a half-written database behind.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import InputError, MissingDependencyError, OutputError
from ..h5 import Reader, find_pair, stored_pairs
from ..images import ImageList
from .colmap3 import write_colmap3

log = logging.getLogger(__name__)

CAMERA_MODEL = "SIMPLE_RADIAL"
FOCAL_PRIOR_FACTOR = 1.2  # COLMAP's default: focal = 1.2 * max(width, height)
FILM_DIAGONAL_MM = float(np.hypot(36.0, 24.0))
CAMERA_MODES = ("single", "per-image")
#: Database layouts: COLMAP 3.x's (read by every COLMAP and pycolmap), pycolmap 4's.
COLMAP_VERSIONS = ("3", "4")
#: What to tell a user whose COLMAP stops on a database of the other layout.
LAYOUT_HINT = {
    "3": "COLMAP 3.x layout (colmap 3.x reads it; COLMAP >= 3.12 and pycolmap upgrade it "
    "when they open it)",
    "4": "COLMAP 4 layout with rigs and frames (COLMAP >= 3.12, pycolmap 4); a colmap 3.11 "
    "or older stops on it with 'SQL logic error': export with --colmap-version 3",
}


@contextmanager
def colmap_logging(pycolmap: ModuleType, verbose: bool) -> Iterator[None]:
    """COLMAP's own (glog) messages on stderr only when ``verbose``; restored on exit."""
    before = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = 0 if verbose else 3
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = before


def require_pycolmap() -> ModuleType:
    """Import pycolmap, or a one-line error telling how to install it."""
    from ..signals import descmatch_signals

    try:
        with descmatch_signals():  # importing pycolmap replaces the SIGTERM handler
            import pycolmap
    except ImportError:
        raise MissingDependencyError(
            "pycolmap is not installed: pip install 'descmatch[sfm]'"
        ) from None
    return pycolmap


# -- EXIF ------------------------------------------------------------------------------------
def exif_focal_35mm(path: str | Path) -> float | None:
    """FocalLengthIn35mmFilm (EXIF tag 0xA405, mm) of an image file, or None.

    Read with Pillow from the image's header (any format Pillow reads EXIF from: JPEG, TIFF,
    PNG, WebP); a missing, zero or malformed tag gives None.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged EXIF block reads as no focal length
            with Image.open(path) as img:
                exif = img.getexif()
                value = exif.get_ifd(0x8769).get(0xA405, exif.get(0xA405))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    try:
        focal = float(value) if value is not None else 0.0
    except (TypeError, ValueError):
        return None
    return focal if focal > 0 else None


def focal_prior(path: str | Path | None, width: int, height: int) -> tuple[float, bool]:
    """Focal length in pixels and whether it comes from EXIF (a prior COLMAP can trust)."""
    f35 = exif_focal_35mm(path) if path is not None else None
    if f35 is not None:
        return f35 / FILM_DIAGONAL_MM * float(np.hypot(width, height)), True
    return FOCAL_PRIOR_FACTOR * max(width, height), False


# -- descriptors -----------------------------------------------------------------------------
def colmap_descriptors(desc: np.ndarray) -> np.ndarray:
    """descmatch descriptors to COLMAP's 128-D uint8: L2-normalise, x512, clip to [0,255].

    Shape: (N,128) float -> (N,128) uint8.
    """
    d = np.asarray(desc, np.float32)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    d = d / np.maximum(norm, 1e-12)
    return np.clip(np.round(d * 512.0), 0, 255).astype(np.uint8)


# -- the export ------------------------------------------------------------------------------
@dataclass
class ColmapExportResult:
    database: Path
    images: int = 0
    cameras: int = 0
    pairs: int = 0  # pairs with matches written
    matches: int = 0
    verified_pairs: int = 0  # pairs with a two-view geometry that has inliers
    inlier_matches: int = 0
    skipped_pairs: int = 0  # pairs of the matches file naming images outside IMAGES
    seconds: float = 0.0
    verify_seconds: float = 0.0


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _pairs_to_export(
    mr: Reader, names: list[str], pairs: list[tuple[str, str]] | None, result: ColmapExportResult
) -> list[tuple[str, str, str]]:
    """(key, name0, name1) of the stored pairs to export, name0 being the image whose
    keypoints ``matches0`` indexes (pair keys: see descmatch.pairkeys)."""
    if pairs is None:
        todo, result.skipped_pairs = stored_pairs(mr, names)
        return todo
    todo = []
    known = set(names)
    for a, b in pairs:
        if a not in known or b not in known:
            raise InputError(f"pair {a} {b}: names an image that is not exported")
        found = find_pair(mr, a, b)
        if found is None:
            raise InputError(
                f"{mr.path}: has no matches for {a} {b} (run descmatch match with these pairs)"
            )
        todo.append((found[0], b, a) if found[1] else (found[0], a, b))
    return todo


def export_colmap(
    features: str | Path,
    matches: str | Path,
    images: ImageList,
    database: str | Path,
    camera_mode: str = "single",
    descriptors: bool = False,
    verify: bool = True,
    overwrite: bool = False,
    min_inliers: int = 15,
    max_error: float = 4.0,
    num_threads: int = -1,
    seed: int = 0,
    pairs: list[tuple[str, str]] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    colmap_log: bool = False,
    colmap_version: str = "3",
) -> ColmapExportResult:
    """Write the images of ``images`` with their keypoints (and descriptors), the matches of
    ``matches`` between them (all pairs of the file between these images, or ``pairs``),
    and their two-view geometries into a new COLMAP database.

    Raises OutputError for an existing database (unless ``overwrite``), InputError for images
    missing from the features file or matches that do not fit them. ``colmap_log``: let
    COLMAP print its own messages. ``colmap_version``: the database layout, ``"3"`` (COLMAP
    3.x's, which every COLMAP and pycolmap reads) or ``"4"`` (pycolmap 4's rigs and frames).
    """
    if colmap_version not in COLMAP_VERSIONS:
        raise InputError(
            f"COLMAP version {colmap_version!r}: expected one of {', '.join(COLMAP_VERSIONS)}"
        )
    pycolmap = require_pycolmap()
    with colmap_logging(pycolmap, colmap_log):
        return _export(
            pycolmap,
            features,
            matches,
            images,
            database,
            camera_mode,
            descriptors,
            verify,
            overwrite,
            min_inliers,
            max_error,
            num_threads,
            seed,
            pairs,
            progress,
            colmap_version,
        )


def _export(
    pycolmap: Any,
    features: str | Path,
    matches: str | Path,
    images: ImageList,
    database: str | Path,
    camera_mode: str,
    descriptors: bool,
    verify: bool,
    overwrite: bool,
    min_inliers: int,
    max_error: float,
    num_threads: int,
    seed: int,
    pairs: list[tuple[str, str]] | None,
    progress: Callable[[int, int, str], None] | None,
    colmap_version: str,
) -> ColmapExportResult:
    features, matches, database = Path(features), Path(matches), Path(database)
    t0 = time.perf_counter()
    if camera_mode not in CAMERA_MODES:
        raise InputError(f"camera mode {camera_mode!r}: expected one of {', '.join(CAMERA_MODES)}")
    if database.is_dir():
        raise OutputError(f"{database}: is a folder, not a database file")
    if database.exists() and not overwrite:
        raise OutputError(f"{database}: exists; pass --overwrite to replace it")
    if not database.parent.is_dir():
        raise OutputError(f"{database}: folder {database.parent} does not exist")
    part = database.with_name(database.name + ".part")
    # pycolmap writes its own layout; the 3.x database is copied from it at the end.
    part4 = database.with_name(database.name + ".colmap4.part") if colmap_version == "3" else part
    for p in {part, part4}:
        for stale in (p, Path(str(p) + "-journal")):
            stale.unlink(missing_ok=True)
    try:
        result = _write(
            pycolmap,
            features,
            matches,
            images,
            part4,
            camera_mode,
            descriptors,
            verify,
            min_inliers,
            max_error,
            num_threads,
            seed,
            pairs,
            progress,
        )
        if colmap_version == "3":
            write_colmap3(part4, part)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        if part4 != part:
            part4.unlink(missing_ok=True)
    os.replace(part, database)
    result.database = database
    result.seconds = time.perf_counter() - t0
    return result


def _write(
    pycolmap: Any,
    features: Path,
    matches: Path,
    images: ImageList,
    part: Path,
    camera_mode: str,
    descriptors: bool,
    verify: bool,
    min_inliers: int,
    max_error: float,
    num_threads: int,
    seed: int,
    pairs: list[tuple[str, str]] | None,
    progress: Callable[[int, int, str], None] | None,
) -> ColmapExportResult:
    """Everything into ``part`` in pycolmap's layout, then COLMAP's geometric verification."""
    names = list(images.names)
    result = ColmapExportResult(part)
    with Reader(features, "features") as fr, Reader(matches, "matches") as mr:
        known = set(fr.keys)
        missing = [n for n in names if n not in known]
        if missing:
            raise InputError(
                f"{features}: has no features for {len(missing)} of the "
                f"{len(names)} images: {_listing(missing)} (run descmatch "
                "extract on the same images)"
            )
        dim = int(fr.attrs.get("descriptor_dim", 0))
        if descriptors and dim != 128:
            raise InputError(
                f"{features}: descriptors are {dim}-D ({fr.attrs.get('method')}); "
                "COLMAP stores 128-D uint8 descriptors: leave out --descriptors or "
                "extract with a 128-D method (sosnet, hardnet, rootsift)"
            )
        sizes: dict[str, tuple[int, int]] = {}
        for n in names:
            w, h = (int(v) for v in fr._f[n]["image_size"][()])
            sizes[n] = (w, h)
        num_kpts = {n: int(fr._f[n]["keypoints"].shape[0]) for n in names}
        if camera_mode == "single" and len(set(sizes.values())) > 1:
            vals = list(sizes.values())
            cw, ch = max(set(vals), key=vals.count)
            odd = [f"{n} ({w}x{h})" for n, (w, h) in sizes.items() if (w, h) != (cw, ch)]
            raise InputError(
                f"{images.root}: images of {len(set(vals))} different sizes share one "
                f"camera: {_listing(odd)} differ from the {cw}x{ch} of the others; use "
                "--camera-mode per-image, or leave those images out"
            )
        todo = _pairs_to_export(mr, names, pairs, result)
        db = pycolmap.Database.open(str(part))  # creates the file (COLMAP needs it to exist)
        try:
            with pycolmap.DatabaseTransaction(db):
                ids = _write_images(pycolmap, db, images, names, sizes, camera_mode, result)
                total = len(names) + len(todo)
                for i, n in enumerate(names):
                    g = fr._f[n]
                    kp = g["keypoints"][()].astype(np.float32) + 0.5
                    db.write_keypoints(ids[n], kp)
                    if descriptors:
                        d = colmap_descriptors(g["descriptors"][()].T)
                        db.write_descriptors(
                            ids[n],
                            pycolmap.FeatureDescriptors(pycolmap.FeatureExtractorType.SIFT, d),
                        )
                    if progress:
                        progress(i + 1, total, n)
                done: set[int] = set()
                for i, (key, a, b) in enumerate(todo):
                    pid = pycolmap.image_pair_to_pair_id(ids[a], ids[b])
                    if pid in done:  # the same pair stored in both orders
                        continue
                    done.add(pid)
                    m0 = mr._f[key]["matches0"][()]
                    if len(m0) != num_kpts[a] or (len(m0) and int(m0.max()) >= num_kpts[b]):
                        raise InputError(
                            f"{matches}: matches of {a} {b} do not fit the "
                            f"keypoints in {features} (made from other features?)"
                        )
                    i0 = np.nonzero(m0 >= 0)[0]
                    kept = np.stack([i0, m0[i0]], 1).astype(np.uint32)
                    db.write_matches(ids[a], ids[b], kept)
                    result.pairs += 1
                    result.matches += len(kept)
                    if not verify and len(kept):
                        tvg = pycolmap.TwoViewGeometry()
                        tvg.config = pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
                        tvg.inlier_matches = kept
                        db.write_two_view_geometry(ids[a], ids[b], tvg)
                    if progress:
                        progress(len(names) + i + 1, total, key)
        finally:
            db.close()
    if result.skipped_pairs:
        log.info(
            "%s: %d pair(s) name images outside %s, skipped",
            matches,
            result.skipped_pairs,
            images.root,
        )
    if verify and result.pairs:
        tv = time.perf_counter()
        opts = pycolmap.TwoViewGeometryOptions()
        opts.min_num_inliers = min_inliers
        opts.ransac.max_error = max_error
        opts.ransac.random_seed = seed
        vopts = pycolmap.GeometricVerifierOptions()
        vopts.num_threads = num_threads
        pycolmap.geometric_verification(
            str(part), vopts, pycolmap.ExistingMatchedPairingOptions(), opts
        )
        result.verify_seconds = time.perf_counter() - tv
    with pycolmap.Database.open(str(part)) as db:
        _, inliers = db.read_two_view_geometry_num_inliers()
        result.verified_pairs = sum(1 for v in inliers if v > 0)
        result.inlier_matches = int(sum(inliers))
    return result


def _write_images(
    pycolmap: Any,
    db: Any,
    images: ImageList,
    names: list[str],
    sizes: dict[str, tuple[int, int]],
    camera_mode: str,
    result: ColmapExportResult,
) -> dict[str, int]:
    """Cameras, one rig per camera, images and one frame per image. Returns image ids."""
    ids: dict[str, int] = {}
    shared: tuple[int, int] | None = None  # (camera_id, rig_id)
    for n in names:
        w, h = sizes[n]
        if shared is None or camera_mode == "per-image":
            f, prior = focal_prior(images.path(n), w, h)
            cam = pycolmap.Camera.create_from_model_name(0, CAMERA_MODEL, f, w, h)
            cam.has_prior_focal_length = prior
            cam_id = db.write_camera(cam)
            rig = pycolmap.Rig()
            rig.add_ref_sensor(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cam_id))
            shared = (cam_id, db.write_rig(rig))
            result.cameras += 1
        cam_id, rig_id = shared
        image_id = db.write_image(pycolmap.Image(name=n, camera_id=cam_id))
        frame = pycolmap.Frame()
        frame.rig_id = rig_id
        frame.add_data_id(
            pycolmap.data_t(pycolmap.sensor_t(pycolmap.SensorType.CAMERA, cam_id), image_id)
        )
        db.write_frame(frame)
        ids[n] = image_id
        result.images += 1
    return ids
