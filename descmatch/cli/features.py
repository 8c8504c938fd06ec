"""detect, extract and match: images to features, features (or two images) to matches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import DescmatchError
from ..match import DEFAULT_RATIO
from .app import app, progress, say, torch_device
from .options import (
    DESCRIBE,
    DETECT,
    PAIRS_HELP,
    READ,
    Geometry,
    HalfOpt,
    MutualOpt,
    OverwriteOpt,
    PipelineOptions,
    RatioOpt,
    StrictOpt,
    image_list,
    pipeline_options,
    refuse_list_file,
)

ImagesArg = Annotated[
    str,
    typer.Argument(help="Folder (recursive), glob, image, or text file listing image paths."),
]


def _extract_summary(res: Any, describe: bool) -> None:
    rate = f", {res.patches_per_second:,.0f} patches/s" if describe and res.images else ""
    say(
        f"{res.path}: {res.images} image(s) in {res.seconds:.1f} s, "
        f"{res.keypoints_per_image:,.0f} keypoints/image{rate}; "
        f"{res.skipped_existing} already done, {len(res.failed)} unreadable"
    )
    for name, why in res.failed:
        say(f"  skipped {name}: {why}")


@app.command()
@pipeline_options(DETECT, READ)
def detect(
    images: ImagesArg,
    output: Annotated[Path, typer.Argument(help="features.h5 to write (keypoints only).")],
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    *,
    opts: PipelineOptions,
) -> None:
    """Detect keypoints only (SIFT/DoG), for inspection and for other tools."""
    from ..extract import extract

    imgs = image_list(images, opts)
    refuse_list_file(output, images)
    det = opts.build_detector()
    with progress("detect") as cb:
        res = extract(imgs, output, None, det, opts.resize_max, overwrite, strict, progress=cb)
    _extract_summary(res, describe=False)


@app.command("extract")
@pipeline_options(DESCRIBE, DETECT, READ)
def extract_cmd(
    images: ImagesArg,
    output: Annotated[Path, typer.Argument(help="features.h5 to write or complete.")],
    half: HalfOpt = False,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    *,
    opts: PipelineOptions,
) -> None:
    """Detect keypoints, cut 32x32 patches and describe them into an hloc-style features.h5."""
    from ..extract import extract

    imgs = image_list(images, opts)
    refuse_list_file(output, images)
    detector, describer = opts.build()
    with progress(f"extract {describer.name}") as cb:
        res = extract(
            imgs,
            output,
            describer,
            detector,
            opts.resize_max,
            overwrite,
            strict,
            half=half,
            progress=cb,
        )
    _extract_summary(res, describe=True)


@app.command("match")
@pipeline_options(DESCRIBE, DETECT, READ)
def match_cmd(
    first: Annotated[str, typer.Argument(help="features.h5, or the first image.")],
    second: Annotated[str, typer.Argument(help="matches.h5 to write, or the second image.")],
    pairs: Annotated[str, typer.Option("--pairs", help=PAIRS_HELP)] = "exhaustive",
    pairs_out: Annotated[
        Path | None,
        typer.Option(
            "--pairs-out",
            help="Where to write the pairs matched (default: OUT's name + -pairs.txt).",
        ),
    ] = None,
    ratio: RatioOpt = DEFAULT_RATIO,
    mutual: MutualOpt = True,
    overwrite: OverwriteOpt = False,
    viz: Annotated[
        Path | None,
        typer.Option("--viz", help="Two-image mode: draw the matches to this picture (png/jpg)."),
    ] = None,
    geometry: Annotated[
        Geometry,
        typer.Option("--geometry", help="Two-image mode: RANSAC model that separates inliers."),
    ] = Geometry.fundamental,
    *,
    opts: PipelineOptions,
) -> None:
    """Match features (FEATURES.h5 OUT.h5), or two images directly (A.jpg B.jpg).

    Mutual nearest neighbours with Lowe's ratio test, as chunked matrix products on the
    device. In two-image mode the images are extracted on the fly (the detector and describer
    options apply), RANSAC separates inliers, and --viz draws them.
    """
    from ..images import looks_like_image

    ratio_v: float | None = None if ratio >= 1.0 else ratio
    if looks_like_image(first) and looks_like_image(second):
        _match_two(Path(first), Path(second), ratio_v, mutual, viz, geometry, opts)
        return
    from ..h5 import Reader
    from ..match import match
    from ..pairs import pairs_for

    if viz is not None:
        raise DescmatchError("--viz applies to two-image mode (descmatch match A.jpg B.jpg)")
    pairs_file = (Path(pairs),) if Path(pairs).is_file() else ()
    with Reader(first, "features") as r:
        names = sorted(r.keys)
    pair_list = pairs_for(pairs, names, first)
    with progress("match") as cb:
        res = match(
            first,
            pair_list,
            second,
            ratio_v,
            mutual,
            torch_device(opts.device),
            overwrite,
            pairs_out,
            progress=cb,
            inputs=pairs_file,
        )
    mean = res.matches_total / res.matched if res.matched else 0.0
    say(
        f"{res.path}: {res.matched} pair(s) matched in {res.seconds:.1f} s, "
        f"{mean:,.0f} matches/pair; {res.skipped} already done; pairs in {res.pairs_path}"
    )


def _match_two(
    a: Path,
    b: Path,
    ratio: float | None,
    mutual: bool,
    viz: Path | None,
    geometry: Geometry,
    opts: PipelineOptions,
) -> None:
    from ..two_view import match_images

    if viz is not None:  # before any work: an extension OpenCV writes, a writable place
        from ..export.viz import check_image_output
        from ..outputs import refuse_inputs

        check_image_output(viz)
        refuse_inputs(viz, (a, b), "--viz picture")
    det, describer = opts.build()
    res = match_images(
        a,
        b,
        det,
        describer,
        ratio,
        mutual,
        geometry.value,
        opts.torch_device(),
        opts.resize_max,
        opts.max_pixel_count(),
    )
    say(
        f"{a.name} ({len(res.keypoints0)} keypoints) - {b.name} ({len(res.keypoints1)} "
        f"keypoints), {res.describer}: {len(res.matches)} matches, {int(res.inliers.sum())} "
        f"inliers ({geometry.value}), {res.seconds:.1f} s"
    )
    if viz is not None:
        res.draw(viz)
        say(f"wrote {viz}")
