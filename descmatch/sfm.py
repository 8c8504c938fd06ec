"""Structure from motion from images to a sparse COLMAP model, stage by stage:

    extract   IMAGES -> OUT/features.h5
    pairs     -> OUT/pairs.txt            (exhaustive, sequential:K, retrieval:K or a file)
    match     -> OUT/matches.h5
    export    -> OUT/database.db          (pycolmap; two-view geometries verified by COLMAP;
                                           its settings in OUT/database.json)
    mapping   -> OUT/sparse/0, 1, ...     (pycolmap incremental mapping, COLMAP binary;
                                           the model with the most images is 0)

Every stage resumes from its files: extract and match complete what is missing, pairs are
kept while they were made by the same spec over the same images, and the database and the
model are kept only while they were built from the very files there now: database.json
records the settings and a fingerprint of features.h5 and matches.h5 (their image and pair
names, sizes and modification times), model.json the database's; each record is removed
before its stage starts and written when it ends, so a run killed at any point rebuilds
what it left stale. A run that registers no model raises ReconstructionError and keeps
every file made so far. The folder is locked while a run works in it (OUT/sfm.lock), and
pycolmap's own SIGINT/SIGTERM handlers are replaced by descmatch's around its calls, so a
signal stops the run with its finished work saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, ReconstructionError
from .evaluate import PoseErrorSummary, relative_pose_errors, summarize_pose_errors
from .export.colmap import (
    ColmapExportResult,
    colmap_logging,
    export_colmap,
    require_pycolmap,
)
from .extract import extract
from .h5 import Reader, find_pair
from .images import ImageList
from .lock import OutputLock
from .match import DEFAULT_RATIO, match
from .outputs import check_folder
from .pairs import pairs_comment, pairs_for, read_pairs, write_pairs_commented
from .signals import descmatch_signals

log = logging.getLogger(__name__)

STAGES = ("extract", "pairs", "match", "export", "mapping")
MODEL_FILES = ("cameras.bin", "images.bin", "points3D.bin")


@dataclass
class Stage:
    """One stage's outcome: wall time, whether it was skipped (its files were up to date),
    and a one-line note (what it made)."""

    name: str
    seconds: float
    skipped: bool
    note: str = ""


@dataclass
class SfmResult:
    out_dir: Path
    images: int = 0
    stages: list[Stage] = field(default_factory=list)
    model_path: Path | None = None
    models: int = 0
    registered: int = 0
    unregistered: list[str] = field(default_factory=list)
    points3d: int = 0
    mean_track_length: float = 0.0
    mean_reprojection_error: float = 0.0
    pose_errors: PoseErrorSummary | None = None

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages)


@dataclass
class SfmConfig:
    pairs: str = "exhaustive"
    camera_mode: str = "single"
    verify: bool = True
    ratio: float | None = DEFAULT_RATIO
    mutual: bool = True
    max_side: int | None = None
    device: Any = "cpu"
    num_threads: int = -1  # COLMAP threads (-1: all cores)
    seed: int = 0
    min_model_size: int = 3  # registered images a model needs to be kept
    overwrite: bool = False
    colmap_log: bool = False  # COLMAP's own (glog) progress messages on stderr


def _verified_pairs(database: Path) -> int:
    """Pairs with inliers in a COLMAP database, read without touching the file (opening it
    through COLMAP updates it)."""
    con = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return int(
            con.execute("SELECT COUNT(*) FROM two_view_geometries WHERE rows > 0").fetchone()[0]
        )
    except sqlite3.Error:
        return 0
    finally:
        con.close()


def _model_done(path: Path) -> bool:
    return all((path / f).is_file() for f in MODEL_FILES)


def _names_digest(names: list[str]) -> str:
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:12]


def _fingerprint(files: list[Path], names: list[str], pairs: list[tuple[str, str]]) -> str:
    """What a database is built from: the image and pair names and each file's size and
    modification time (descmatch replaces a file it changes, so any change shows)."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {st.st_mtime_ns} {st.st_ino}\n".encode())
    h.update("\n".join(names).encode() + b"\0")
    h.update("\n".join(f"{a}\t{b}" for a, b in pairs).encode())
    return h.hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    """Write a record atomically (a half-written record must not look valid)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, sort_keys=True) + "\n")
    tmp.replace(path)


def run_sfm(
    images: ImageList,
    out_dir: str | Path,
    detector: Any,
    describer: Any,
    config: SfmConfig | None = None,
    cameras: str | Path | None = None,
    progress: Callable[[str, int, int, str], None] | None = None,
    on_stage: Callable[[Stage], None] | None = None,
) -> SfmResult:
    """Run (or resume) the pipeline into ``out_dir``; see the module docstring.

    ``cameras``: a ``cameras.txt`` of the true cameras; the relative rotation and translation
    direction errors of all registered image pairs are then in ``result.pose_errors``.
    ``progress(stage, i, n, name)`` reports work inside a stage, ``on_stage`` each finished
    stage. Raises ReconstructionError when no model is registered (files kept).
    """
    cfg = config or SfmConfig()
    out_dir = Path(out_dir)
    with descmatch_signals():
        pycolmap = require_pycolmap()
    check_folder(out_dir)
    with (
        OutputLock(out_dir / "sfm", name=str(out_dir)),
        colmap_logging(pycolmap, cfg.colmap_log),
    ):
        return _run(
            pycolmap, images, out_dir, detector, describer, cfg, cameras, progress, on_stage
        )


def _run(
    pycolmap: Any,
    images: ImageList,
    out_dir: str | Path,
    detector: Any,
    describer: Any,
    cfg: SfmConfig,
    cameras: str | Path | None,
    progress: Callable[[str, int, int, str], None] | None,
    on_stage: Callable[[Stage], None] | None,
) -> SfmResult:
    out_dir = Path(out_dir)
    result = SfmResult(out_dir)
    feats = out_dir / "features.h5"
    pairs_path = out_dir / "pairs.txt"
    matches_path = out_dir / "matches.h5"
    database = out_dir / "database.db"
    sparse = out_dir / "sparse"

    def done(stage: Stage) -> None:
        result.stages.append(stage)
        if on_stage:
            on_stage(stage)

    def prog(stage: str) -> Callable[[int, int, str], None] | None:
        if progress is None:
            return None
        return lambda i, n, name: progress(stage, i, n, name)

    # -- extract ---------------------------------------------------------------------------
    t = time.perf_counter()
    ex = extract(
        images, feats, describer, detector, cfg.max_side, cfg.overwrite, progress=prog("extract")
    )
    with Reader(feats, "features") as r:
        have = set(r.keys)
    names = [n for n in images.names if n in have]
    result.images = len(names)
    dirty = ex.images > 0
    note = f"{ex.images} image(s) extracted, {ex.keypoints_per_image:,.0f} keypoints/image"
    if ex.failed:
        note += f", {len(ex.failed)} unreadable: " + ", ".join(n for n, _ in ex.failed[:5])
    done(
        Stage(
            "extract",
            time.perf_counter() - t,
            not dirty,
            note if dirty else f"{len(names)} image(s) already extracted",
        )
    )
    if len(names) < 2:
        raise ReconstructionError(
            f"{images.root}: {len(names)} readable image(s); structure from motion needs at least 2"
        )

    # -- pairs -----------------------------------------------------------------------------
    t = time.perf_counter()
    comment = f"descmatch pairs {cfg.pairs}; {len(names)} images; {_names_digest(names)}"
    old = None
    if pairs_path.is_file() and not dirty:
        try:
            old = read_pairs(pairs_path, set(names))
        except InputError:  # names images that are gone: made again below
            old = None
    if old is not None and not cfg.overwrite and pairs_comment(pairs_path) == comment:
        pair_list = old
        done(Stage("pairs", time.perf_counter() - t, True, f"{len(pair_list)} pairs kept"))
    else:
        pair_list = pairs_for(cfg.pairs, names, feats, cfg.seed)
        write_pairs_commented(pairs_path, pair_list, comment)
        dirty = dirty or pair_list != old
        done(
            Stage("pairs", time.perf_counter() - t, False, f"{len(pair_list)} pairs ({cfg.pairs})")
        )

    # -- match -----------------------------------------------------------------------------
    t = time.perf_counter()
    todo = len(pair_list)
    if matches_path.is_file() and not cfg.overwrite:
        with Reader(matches_path, "matches") as r:
            todo = sum(1 for a, b in pair_list if find_pair(r, a, b) is None)
    if todo == 0:
        done(
            Stage("match", time.perf_counter() - t, True, f"{len(pair_list)} pairs already matched")
        )
    else:
        mres = match(
            feats,
            pair_list,
            matches_path,
            cfg.ratio,
            cfg.mutual,
            cfg.device,
            cfg.overwrite,
            out_dir / "matches-pairs.txt",
            progress=prog("match"),
        )
        dirty = True
        mean = mres.matches_total / mres.matched if mres.matched else 0.0
        done(
            Stage(
                "match",
                time.perf_counter() - t,
                False,
                f"{mres.matched} pair(s) matched, {mean:,.0f} matches/pair",
            )
        )

    # -- export ----------------------------------------------------------------------------
    t = time.perf_counter()
    settings_file = out_dir / "database.json"  # how the database was made, and from what
    settings = {
        "camera_mode": cfg.camera_mode,
        "verify": cfg.verify,
        "seed": cfg.seed,
        "inputs": _fingerprint([feats, matches_path], names, pair_list),
    }
    same = _read_json(settings_file) == settings
    if database.is_file() and same and not dirty and not cfg.overwrite:
        verified = _verified_pairs(database)
        done(
            Stage(
                "export", time.perf_counter() - t, True, f"database kept, {verified} verified pairs"
            )
        )
    else:
        settings_file.unlink(missing_ok=True)  # the database is stale from here on
        with descmatch_signals():
            xres: ColmapExportResult = export_colmap(
                feats,
                matches_path,
                images.subset(names),
                database,
                cfg.camera_mode,
                verify=cfg.verify,
                overwrite=True,
                num_threads=cfg.num_threads,
                seed=cfg.seed,
                pairs=pair_list,
                progress=prog("export"),
                colmap_log=cfg.colmap_log,
            )
        _write_json(settings_file, settings)
        dirty = True
        verified = xres.verified_pairs
        done(
            Stage(
                "export",
                time.perf_counter() - t,
                False,
                f"{xres.cameras} camera(s), {xres.pairs} pairs, {xres.verified_pairs} "
                f"verified ({xres.inlier_matches:,} inlier matches)",
            )
        )

    # -- mapping ---------------------------------------------------------------------------
    t = time.perf_counter()
    model0 = sparse / "0"
    model_file = out_dir / "model.json"  # what the model was made from
    model_made = {
        "database": hashlib.sha256(settings_file.read_bytes()).hexdigest(),
        "min_model_size": cfg.min_model_size,
        "seed": cfg.seed,
    }
    kept = _read_json(model_file) == model_made
    if _model_done(model0) and kept and not dirty and not cfg.overwrite:
        recs = [pycolmap.Reconstruction(str(model0))]
        result.models = sum(1 for p in sparse.iterdir() if p.is_dir() and _model_done(p))
        done(Stage("mapping", time.perf_counter() - t, True, "model kept"))
    else:
        model_file.unlink(missing_ok=True)
        with descmatch_signals():
            recs = _map(pycolmap, database, images.root, sparse, cfg, len(names))
        _write_json(model_file, model_made)
        if not recs:
            done(Stage("mapping", time.perf_counter() - t, False, "no model"))
            raise ReconstructionError(
                f"{out_dir}: no model could be registered from {len(names)} images "
                f"({verified} image pairs passed geometric verification, {len(pair_list)} "
                "matched); the images may not overlap, or need more keypoints or more pairs; "
                "features, matches and database are kept"
            )
        result.models = len(recs)
        done(
            Stage(
                "mapping",
                time.perf_counter() - t,
                False,
                f"{len(recs)} model(s), largest {recs[0].num_reg_images()} images",
            )
        )

    rec = recs[0]
    result.model_path = model0
    result.registered = rec.num_reg_images()
    reg_names = {rec.images[i].name for i in rec.reg_image_ids()}
    result.unregistered = [n for n in names if n not in reg_names]
    result.points3d = rec.num_points3D()
    result.mean_track_length = float(rec.compute_mean_track_length()) if result.points3d else 0.0
    result.mean_reprojection_error = (
        float(rec.compute_mean_reprojection_error()) if result.points3d else 0.0
    )
    if cameras is not None:
        result.pose_errors = _pose_errors(rec, cameras)
    return result


def _map(
    pycolmap: Any, database: Path, image_root: Path, sparse: Path, cfg: SfmConfig, num_images: int
) -> list[Any]:
    """Incremental mapping into ``sparse/0..``, the model with the most images first."""
    if sparse.exists():
        shutil.rmtree(sparse)
    work = sparse.with_name(sparse.name + ".part")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = cfg.num_threads
    opts.random_seed = cfg.seed
    opts.min_model_size = min(cfg.min_model_size, num_images)
    pycolmap.set_random_seed(cfg.seed)
    recs = pycolmap.incremental_mapping(str(database), str(image_root), str(work), opts)
    ordered = sorted(recs.values(), key=lambda r: -r.num_reg_images())
    ordered = [r for r in ordered if r.num_reg_images() > 0]
    shutil.rmtree(work)
    if not ordered:
        return []
    sparse.mkdir()
    for i, rec in enumerate(ordered):
        (sparse / str(i)).mkdir()
        rec.write_binary(str(sparse / str(i)))
    return ordered


def _pose_errors(rec: Any, cameras: str | Path) -> PoseErrorSummary:
    from .cameras import read_cameras

    gt_cams = read_cameras(cameras)
    gt = {n: (c.R, c.t) for n, c in gt_cams.items()}
    by_base = {Path(n).name: n for n in gt}
    est: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for i in rec.reg_image_ids():
        img = rec.images[i]
        key = img.name if img.name in gt else by_base.get(Path(img.name).name)
        if key is None:
            continue
        pose = img.cam_from_world()
        est[key] = (np.asarray(pose.rotation.matrix()), np.asarray(pose.translation))
    if not est:
        raise InputError(f"{cameras}: names none of the registered images")
    return summarize_pose_errors(relative_pose_errors(est, gt), len(gt), len(est))
