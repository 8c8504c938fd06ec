"""descmatch sfm and descmatch export colmap: images to a COLMAP model, features and
matches to a COLMAP database."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from ..match import DEFAULT_RATIO
from .app import app, progress, say, stage_progress
from .options import (
    DESCRIBE,
    DETECT,
    PAIRS_HELP,
    READ,
    MutualOpt,
    PipelineOptions,
    RatioOpt,
    image_list,
    pipeline_options,
)


class CameraMode(str, Enum):
    single = "single"
    per_image = "per-image"


class ColmapVersion(str, Enum):
    v3 = "3"
    v4 = "4"


export_app = typer.Typer(help="Export features and matches to other tools.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("colmap")
def export_colmap_cmd(
    features: Annotated[Path, typer.Argument(help="features.h5 (descmatch extract).")],
    matches: Annotated[Path, typer.Argument(help="matches.h5 (descmatch match).")],
    images: Annotated[
        str, typer.Argument(help="The images: folder, glob or list, as given to extract.")
    ],
    database: Annotated[Path, typer.Argument(help="COLMAP database to create.")],
    camera_mode: Annotated[
        CameraMode,
        typer.Option("--camera-mode", help="One camera for all images, or one per image."),
    ] = CameraMode.single,
    descriptors: Annotated[
        bool,
        typer.Option(
            "--descriptors",
            help="Also write descriptors (128-D only, as uint8), so COLMAP can match them itself.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="COLMAP's geometric "
            "verification (RANSAC); --no-verify takes all matches as "
            "inliers.",
        ),
    ] = True,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs", help="Only these pairs (default: every pair in MATCHES between the images)."
        ),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="COLMAP threads (-1: all cores).")] = -1,
    colmap_version: Annotated[
        ColmapVersion,
        typer.Option(
            "--colmap-version",
            help="Database layout: 3, COLMAP 3.x's (the colmap of Debian and Ubuntu; COLMAP "
            ">= 3.12 and pycolmap read it too); 4, pycolmap 4's rigs and frames (COLMAP >= 3.12 "
            "only).",
        ),
    ] = ColmapVersion.v3,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing database.")
    ] = False,
) -> None:
    """Write cameras (SIMPLE_RADIAL), images, keypoints (+0.5 px), matches and two-view
    geometries into a new COLMAP database (needs pycolmap: pip install 'descmatch\\[sfm]'),
    for `colmap mapper --database_path DATABASE --image_path IMAGES --output_path OUT`."""
    from ..export.colmap import LAYOUT_HINT, export_colmap, require_pycolmap
    from ..images import list_images
    from ..pairs import read_pairs

    require_pycolmap()
    imgs = list_images(images)
    pair_list = read_pairs(pairs, set(imgs.names)) if pairs is not None else None
    with progress("export colmap") as cb:
        res = export_colmap(
            features,
            matches,
            imgs,
            database,
            camera_mode.value,
            descriptors,
            verify,
            overwrite,
            num_threads=threads,
            pairs=pair_list,
            progress=cb,
            colmap_log=logging.getLogger().level <= logging.DEBUG,
            colmap_version=colmap_version.value,
        )
    skipped = f"; {res.skipped_pairs} pairs outside the images skipped" if res.skipped_pairs else ""
    say(
        f"{database}: {res.images} images, {res.cameras} camera(s), {res.pairs} pairs "
        f"({res.matches:,} matches), {res.verified_pairs} pairs with a two-view geometry "
        f"({res.inlier_matches:,} inliers{', not verified' if not verify else ''}) in "
        f"{res.seconds:.1f} s{skipped}; {LAYOUT_HINT[colmap_version.value]}"
    )


@app.command("sfm")
@pipeline_options(DESCRIBE, DETECT, READ)
def sfm_cmd(
    images: Annotated[str, typer.Argument(help="Folder (recursive), glob, image list.")],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Output folder: features.h5, pairs.txt, matches.h5, database.db, sparse/0."
        ),
    ],
    pairs: Annotated[str, typer.Option("--pairs", help=PAIRS_HELP)] = "exhaustive",
    ratio: RatioOpt = DEFAULT_RATIO,
    mutual: MutualOpt = True,
    camera_mode: Annotated[
        CameraMode,
        typer.Option("--camera-mode", help="One camera for all images, or one per image."),
    ] = CameraMode.single,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify", help="COLMAP's geometric verification of the matches."
        ),
    ] = True,
    cameras: Annotated[
        Path | None,
        typer.Option(
            "--cameras",
            help="cameras.txt of the true "
            "cameras: report relative rotation and translation direction "
            "errors of the registered image pairs.",
        ),
    ] = None,
    threads: Annotated[int, typer.Option("--threads", help="COLMAP threads (-1: all cores).")] = -1,
    min_model_size: Annotated[
        int,
        typer.Option("--min-model-size", min=2, help="Registered images a model needs to be kept."),
    ] = 3,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of retrieval and COLMAP's RANSAC and mapping.")
    ] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo every stage instead of resuming.")
    ] = False,
    *,
    opts: PipelineOptions,
) -> None:
    """Structure from motion: extract, pairs, match, export to a COLMAP database and
    incremental mapping (pycolmap) into OUT_DIR/sparse/0; each stage resumes from its files.
    Needs pycolmap: pip install 'descmatch\\[sfm]'."""
    from ..export.colmap import require_pycolmap
    from ..sfm import SfmConfig, Stage, run_sfm

    require_pycolmap()
    imgs = image_list(images, opts)
    if cameras is not None and not cameras.is_file():
        raise InputError(f"{cameras}: no such cameras file")
    detector, describer = opts.build()
    cfg = SfmConfig(
        pairs=pairs,
        camera_mode=camera_mode.value,
        verify=verify,
        ratio=None if ratio >= 1.0 else ratio,
        mutual=mutual,
        max_side=opts.resize_max,
        device=opts.torch_device(),
        num_threads=threads,
        seed=seed,
        min_model_size=min_model_size,
        overwrite=overwrite,
        colmap_log=logging.getLogger().level <= logging.DEBUG,
    )

    def stage_line(s: Stage) -> None:
        say(f"{s.name:<8} {s.seconds:7.1f} s  {'(done before) ' if s.skipped else ''}{s.note}")

    with stage_progress("sfm") as cb:
        res = run_sfm(
            imgs, out_dir, detector, describer, cfg, cameras, progress=cb, on_stage=stage_line
        )
    say(
        f"{res.model_path}: {res.registered}/{res.images} images registered, "
        f"{res.points3d:,} 3D points, mean track length {res.mean_track_length:.2f}, "
        f"mean reprojection error {res.mean_reprojection_error:.3f} px"
        + (f" ({res.models} models)" if res.models > 1 else "")
        + f"; {res.seconds:.1f} s in all"
    )
    if res.unregistered:
        say(
            f"not registered: {', '.join(res.unregistered[:10])}"
            + (f" and {len(res.unregistered) - 10} more" if len(res.unregistered) > 10 else "")
        )
    pe = res.pose_errors
    if pe is not None:
        say(
            f"relative pose errors vs {cameras} ({pe.pairs} pairs of {pe.registered}/"
            f"{pe.cameras} cameras): rotation median {pe.rotation_median:.3f} deg, mean "
            f"{pe.rotation_mean:.3f} deg; translation direction median "
            f"{pe.translation_median:.3f} deg, mean {pe.translation_mean:.3f} deg; "
            f"{100 * pe.within_5deg:.0f}% of pairs within 5 deg"
        )
