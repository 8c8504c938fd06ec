"""descmatch eval: homography and epipolar accuracy of matches, FPR95 on patch pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app, out, torch_device
from .options import (
    DESCRIBE,
    DETECT,
    BatchOpt,
    DeviceOpt,
    MutualOpt,
    PipelineOptions,
    WeightsOpt,
    pipeline_options,
    ratio_in_range,
)

eval_app = typer.Typer(
    help="Evaluate descriptors: patch verification and homography pairs.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")


@eval_app.command("homography")
@pipeline_options(DESCRIBE, DETECT)
def eval_homography(
    sequences: Annotated[
        list[Path],
        typer.Argument(help="HPatches-style folders: images 1..6 and H_1_i homographies."),
    ],
    ratio: Annotated[
        float,
        typer.Option(
            "--ratio",
            callback=ratio_in_range,
            help="Ratio test (1 = none: the protocol is mutual nearest neighbours alone).",
        ),
    ] = 1.0,
    mutual: MutualOpt = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the rows as JSON.")
    ] = None,
    *,
    opts: PipelineOptions,
) -> None:
    """Matches, correct matches and MMA at 1/2/3/5/10 px under the true homography, and the
    RANSAC homography's accuracy (mean corner error within 1/3/5 px), for pairs 1-i."""
    import json

    from ..evaluate import THRESHOLDS, evaluate_homography

    detector, describer = opts.build()
    rows = []
    for seq in sequences:
        rows += evaluate_homography(
            seq, describer, detector, None if ratio >= 1 else ratio, mutual, opts.torch_device()
        )
    table = Table(
        "sequence",
        "pair",
        "matches",
        "correct@3",
        "possible@3",
        "framed@3",
        *[f"MMA@{t}" for t in THRESHOLDS],
        "H err px",
        title=f"{describer.name}, {opts.max_keypoints} keypoints",
        caption="possible@3: the most one-to-one matches these keypoints allow "
        "within 3 px (no descriptor can find more); framed@3: of those, with "
        "orientations within 30 degrees and sizes within 1.5x",
    )
    for r in rows:
        table.add_row(
            r.sequence,
            r.pair,
            str(r.matches),
            str(r.correct[3]),
            str(r.possible),
            str(r.framed),
            *[f"{r.mma(t):.3f}" for t in THRESHOLDS],
            f"{r.corner_error:.2f}",
        )
    m = sum(r.matches for r in rows)
    c = {t: sum(r.correct[t] for r in rows) for t in THRESHOLDS}
    table.add_row(
        "all",
        "",
        str(m),
        str(c[3]),
        str(sum(r.possible for r in rows)),
        str(sum(r.framed for r in rows)),
        *[f"{c[t] / max(m, 1):.3f}" for t in THRESHOLDS],
        " ".join(f"{sum(r.corner_error <= t for r in rows)}/{len(rows)}@{t}" for t in (1, 3, 5)),
    )
    out.print(table)
    if json_out is not None:
        json_out.write_text(
            json.dumps(
                {
                    "method": describer.name,
                    "weights": describer.meta.get("weights", ""),
                    "max_keypoints": opts.max_keypoints,
                    "ratio": ratio,
                    "mutual": mutual,
                    "rows": [
                        {
                            "sequence": r.sequence,
                            "pair": r.pair,
                            "matches": r.matches,
                            "correct": r.correct,
                            "possible@3": r.possible,
                            "framed@3": r.framed,
                            "corner_error": r.corner_error,
                        }
                        for r in rows
                    ],
                },
                indent=1,
            )
        )


@eval_app.command("epipolar")
@pipeline_options(DESCRIBE, DETECT)
def eval_epipolar(
    scenes: Annotated[
        list[Path],
        typer.Argument(help="Scene folders with cameras.txt and images/ (Strecha format)."),
    ],
    ratio: Annotated[
        float, typer.Option("--ratio", callback=ratio_in_range, help="Ratio test (1 = none).")
    ] = 1.0,
    mutual: MutualOpt = True,
    threshold: Annotated[
        float,
        typer.Option("--threshold", help="Correct: symmetric epipolar distance under this (px)."),
    ] = 2.0,
    *,
    opts: PipelineOptions,
) -> None:
    """Matches of consecutive images and how many agree with the true cameras (epipolar
    distance under --threshold px)."""
    from ..evaluate import evaluate_epipolar

    detector, describer = opts.build()
    rows = []
    for scene in scenes:
        rows += evaluate_epipolar(
            scene,
            describer,
            detector,
            None if ratio >= 1 else ratio,
            mutual,
            opts.torch_device(),
            threshold,
        )
    table = Table(
        "scene",
        "pair",
        "matches",
        "correct",
        "precision",
        title=f"{describer.name}, {opts.max_keypoints} keypoints, epipolar < {threshold:g} px",
    )
    for r in rows:
        table.add_row(
            r.scene, r.pair, str(r.matches), str(r.correct), f"{r.correct / max(r.matches, 1):.3f}"
        )
    m, c = sum(r.matches for r in rows), sum(r.correct for r in rows)
    table.add_row("all", "", str(m), str(c), f"{c / max(m, 1):.3f}")
    out.print(table)


@eval_app.command("patches")
def eval_patches(
    dataset: Annotated[
        Path, typer.Argument(help="Brown/PhotoTour folder (patch*.bmp, info.txt, m50_*.txt).")
    ],
    method: Annotated[str, typer.Option("--method", "-m", help="Learned net.")] = "hardnet",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    pairs: Annotated[
        str | None, typer.Option("--pairs", help="m50 file name (default: the largest).")
    ] = None,
) -> None:
    """FPR95: false positive rate at 95% recall on matching / non-matching patch pairs."""
    from ..train.brown import BrownDataset
    from ..train.evaluation import evaluate_fpr95
    from ..weights import load_net

    loaded = load_net(method, weights)
    ds = BrownDataset(dataset, patch_size=loaded.net.patch_size)
    res = evaluate_fpr95(loaded.net, ds, torch_device(device), batch_size or 1024, pairs)
    out.print(
        f"{dataset.name}: {method} ({loaded.path.name}) FPR95 {100 * res['fpr95']:.2f}% "
        f"on {res['num_pairs']:,} pairs ({res['num_matches']:,} matching)",
        highlight=False,
    )
