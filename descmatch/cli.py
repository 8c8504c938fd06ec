"""The descmatch command line: a thin Typer layer over the core functions.

The only module that imports typer or rich. Errors from the core (DescmatchError) become a
one-line message on stderr and the error's exit code.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import __version__
from .describe import DEFAULT_PRECISION
from .errors import ConfigError, DescmatchError, InputError
from .match import DEFAULT_RATIO
from .patches import DEFAULT_MR_SIZE

app = typer.Typer(
    name="descmatch",
    help="Local feature extraction and matching with learned patch descriptors.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# Piped output is not squeezed into 80 columns.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
_state: dict[str, Any] = {"quiet": False}


class Method(str, Enum):
    auto = "auto"
    sift = "sift"
    rootsift = "rootsift"
    l2net = "l2net"
    l2net_cs = "l2net-cs"
    hardnet = "hardnet"
    sosnet = "sosnet"
    sosnet_cs = "sosnet-cs"


class DetectorName(str, Enum):
    sift = "sift"
    dog = "dog"


class Geometry(str, Enum):
    fundamental = "fundamental"
    homography = "homography"


# -- shared options --------------------------------------------------------------------------
MethodOpt = Annotated[
    Method,
    typer.Option(
        "--method",
        "-m",
        help="Descriptor: auto is the "
        "shipped default net (RootSIFT while no trained weights ship).",
    ),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="A checkpoint of your own (or a shipped weights name) for a learned method.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        help="Patches per net call (default: 256 on the CPU, where it is fastest, 2048 on CUDA).",
    ),
]
DetectorOpt = Annotated[
    DetectorName,
    typer.Option(
        "--detector",
        help="sift: OpenCV's DoG detector (CPU); dog: the same detector in torch on "
        "--device (the GPU path; learned descriptors only).",
    ),
]
MaxKptsOpt = Annotated[
    int, typer.Option("--max-keypoints", min=0, help="Keep the strongest keypoints (0 = all).")
]
ResizeOpt = Annotated[
    int | None,
    typer.Option(
        "--resize-max", min=16, help="Downscale images so the longer side is at most this."
    ),
]
UprightOpt = Annotated[
    bool,
    typer.Option(
        "--upright", help="Skip orientation: patches are not rotated (one keypoint per location)."
    ),
]
MrOpt = Annotated[
    float | None,
    typer.Option(
        "--mr-size",
        min=0.5,
        help="Patch window side in "
        f"keypoint sizes (default: the weights' own, else {DEFAULT_MR_SIZE:g}).",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Recompute everything and replace the output instead of resuming."
    ),
]
StrictOpt = Annotated[
    bool, typer.Option("--strict", help="Fail on an unreadable image instead of skipping it.")
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Learned nets: fp32 (reference), "
        "bf16, fp16 (CUDA), int8 (CPU: the nets' shipped int8 models through "
        "ONNX Runtime, pip install 'descmatch[int8]'), or auto (fp16 on CUDA, "
        "bf16 on CPUs that have it).",
    ),
]
FramesOpt = Annotated[
    str,
    typer.Option(
        "--frames",
        help="Learned methods: refine the "
        "detector's keypoint scales with this frame net first (auto: the "
        "shipped weights/frames.pt where there is one; none: the detector's "
        "frames; or a file or shipped name).",
    ),
]
SizePoolOpt = Annotated[
    str,
    typer.Option(
        "--size-pool",
        help="Learned methods: describe "
        "each keypoint as the normalised sum of its descriptors at these "
        "factors of its size (domain-size pooling, e.g. 0.8,1.25; one net "
        "pass per factor; auto: the project's default; none: one patch).",
    ),
]
HalfOpt = Annotated[bool, typer.Option("--half", help="Store descriptors as float16.")]


def _ratio_in_range(value: float) -> float:
    """--ratio: 0 < ratio <= 1 (0 would keep no match, above 1 is no test at all)."""
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value:g} is not in (0, 1]: 1 disables the ratio test")
    return value


RatioOpt = Annotated[
    float,
    typer.Option(
        "--ratio",
        callback=_ratio_in_range,
        help="Lowe's ratio test threshold on L2 distances, in (0, 1] (1 disables it).",
    ),
]
MaxPixelsOpt = Annotated[
    str,
    typer.Option(
        "--max-pixels",
        help="Images above this size (pixels, or megapixels as 50M; none: no limit) are read "
        "at 1/2, 1/4 or 1/8 size; keypoints stay in the images' own pixels.",
    ),
]
MutualOpt = Annotated[
    bool, typer.Option("--mutual/--no-mutual", help="Keep only mutual nearest neighbours.")
]


def _version(value: bool) -> None:
    if value:
        out.print(f"descmatch {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    from .distributed import launch_env

    env = launch_env()
    # Under torchrun only rank 0 draws progress and prints summaries (errors still show).
    _state["quiet"] = quiet or (env is not None and env[0] != 0)
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.WARNING
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_time=False, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # piped or to a file: plain lines, no padding to the console's width
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=level, force=True, handlers=[handler])


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int, str], None]]:
    if _state["quiet"] or not err.is_terminal:  # no bar (nor its blank line) in a pipe
        yield lambda i, n, name: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
        console=err,
        transient=True,
    )
    task = bar.add_task(label, total=None, name="")
    with bar:

        def update(i: int, n: int, name: str) -> None:
            bar.update(task, completed=i, total=n, name=name[-40:])

        yield update


def _say(msg: str) -> None:
    if not _state["quiet"]:
        out.print(msg, highlight=False, soft_wrap=True, markup=False)


def _device(spec: str) -> Any:
    from .device import resolve_device

    return resolve_device(spec)


def _detector(name: DetectorName, max_keypoints: int, upright: bool, dev: Any) -> Any:
    from .detect import build_detector

    extra = {"device": str(dev)} if name == DetectorName.dog else {}
    return build_detector(name.value, max_keypoints=max_keypoints, upright=upright, **extra)


def _setup(
    method: Method,
    weights: str | None,
    device: str,
    batch_size: int | None,
    max_keypoints: int,
    upright: bool,
    mr_size: float | None,
    precision: str = DEFAULT_PRECISION,
    detector: DetectorName = DetectorName.sift,
    frames: str = "auto",
    size_pool: str = "auto",
) -> tuple[Any, Any]:
    from .describe import SiftDescriber, build_describer

    dev = _device(device)
    describer = build_describer(
        method.value, weights, dev, batch_size, mr_size, precision, frames, upright, size_pool
    )
    if detector == DetectorName.dog and isinstance(describer, SiftDescriber):
        raise ConfigError(
            f"--detector dog: {describer.name} needs OpenCV's SIFT scale space; "
            "use --detector sift, or a learned --method"
        )
    return _detector(detector, max_keypoints, upright, dev), describer


def _extract_summary(res: Any, describe: bool) -> None:
    rate = f", {res.patches_per_second:,.0f} patches/s" if describe and res.images else ""
    _say(
        f"{res.path}: {res.images} image(s) in {res.seconds:.1f} s, "
        f"{res.keypoints_per_image:,.0f} keypoints/image{rate}; "
        f"{res.skipped_existing} already done, {len(res.failed)} unreadable"
    )
    for name, why in res.failed:
        _say(f"  skipped {name}: {why}")


# -- commands --------------------------------------------------------------------------------
@app.command()
def detect(
    images: Annotated[
        str,
        typer.Argument(help="Folder (recursive), glob, image, or text file listing image paths."),
    ],
    output: Annotated[Path, typer.Argument(help="features.h5 to write (keypoints only).")],
    max_keypoints: MaxKptsOpt = 4000,
    resize_max: ResizeOpt = None,
    upright: UprightOpt = False,
    detector: DetectorOpt = DetectorName.sift,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    max_pixels: MaxPixelsOpt = "25M",
) -> None:
    """Detect keypoints only (SIFT/DoG), for inspection and for other tools."""
    from .extract import extract
    from .images import list_images, parse_max_pixels

    imgs = list_images(images, parse_max_pixels(max_pixels))
    _refuse_list_file(output, images)
    det = _detector(detector, max_keypoints, upright, _device(device))
    with _progress("detect") as cb:
        res = extract(imgs, output, None, det, resize_max, overwrite, strict, progress=cb)
    _extract_summary(res, describe=False)


@app.command("extract")
def extract_cmd(
    images: Annotated[
        str,
        typer.Argument(help="Folder (recursive), glob, image, or text file listing image paths."),
    ],
    output: Annotated[Path, typer.Argument(help="features.h5 to write or complete.")],
    method: MethodOpt = Method.auto,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    max_keypoints: MaxKptsOpt = 4000,
    resize_max: ResizeOpt = None,
    upright: UprightOpt = False,
    detector: DetectorOpt = DetectorName.sift,
    mr_size: MrOpt = None,
    precision: PrecisionOpt = DEFAULT_PRECISION,
    frames: FramesOpt = "auto",
    size_pool: SizePoolOpt = "auto",
    half: HalfOpt = False,
    overwrite: OverwriteOpt = False,
    strict: StrictOpt = False,
    max_pixels: MaxPixelsOpt = "25M",
) -> None:
    """Detect keypoints, cut 32x32 patches and describe them into an hloc-style features.h5."""
    from .extract import extract
    from .images import list_images, parse_max_pixels

    imgs = list_images(images, parse_max_pixels(max_pixels))
    _refuse_list_file(output, images)
    detector, describer = _setup(
        method,
        weights,
        device,
        batch_size,
        max_keypoints,
        upright,
        mr_size,
        precision,
        detector,
        frames,
        size_pool,
    )
    with _progress(f"extract {describer.name}") as cb:
        res = extract(
            imgs, output, describer, detector, resize_max, overwrite, strict, half=half, progress=cb
        )
    _extract_summary(res, describe=True)


def _refuse_list_file(output: Path, images: str) -> None:
    """The output must not be the text file that lists the images (extract refuses an
    output that is one of the images itself)."""
    from .outputs import refuse_inputs

    if Path(images).is_file():
        refuse_inputs(output, (images,), "features file")


def _looks_like_image(p: str) -> bool:
    from .images import looks_like_image

    return looks_like_image(p)


@app.command("match")
def match_cmd(
    first: Annotated[str, typer.Argument(help="features.h5, or the first image.")],
    second: Annotated[str, typer.Argument(help="matches.h5 to write, or the second image.")],
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help="exhaustive, sequential:K, "
            "retrieval:K, or a pairs file (one 'name0 name1' per "
            "line).",
        ),
    ] = "exhaustive",
    pairs_out: Annotated[
        Path | None,
        typer.Option(
            "--pairs-out",
            help="Where to write the pairs matched (default: OUT's name + -pairs.txt).",
        ),
    ] = None,
    ratio: RatioOpt = DEFAULT_RATIO,
    mutual: MutualOpt = True,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
    viz: Annotated[
        Path | None,
        typer.Option("--viz", help="Two-image mode: draw the matches to this picture (png/jpg)."),
    ] = None,
    geometry: Annotated[
        Geometry,
        typer.Option("--geometry", help="Two-image mode: RANSAC model that separates inliers."),
    ] = Geometry.fundamental,
    method: MethodOpt = Method.auto,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = None,
    max_keypoints: MaxKptsOpt = 4000,
    resize_max: ResizeOpt = None,
    upright: UprightOpt = False,
    detector: DetectorOpt = DetectorName.sift,
    mr_size: MrOpt = None,
    precision: PrecisionOpt = DEFAULT_PRECISION,
    frames: FramesOpt = "auto",
    size_pool: SizePoolOpt = "auto",
) -> None:
    """Match features (FEATURES.h5 OUT.h5), or two images directly (A.jpg B.jpg).

    Mutual nearest neighbours with Lowe's ratio test, as chunked matrix products on the
    device. In two-image mode the images are extracted on the fly, RANSAC separates inliers,
    and --viz draws them.
    """
    ratio_v: float | None = None if ratio >= 1.0 else ratio
    if _looks_like_image(first) and _looks_like_image(second):
        if viz is not None:  # before any work: an extension OpenCV writes, a writable place
            from .export.viz import check_image_output
            from .outputs import refuse_inputs

            check_image_output(viz)
            refuse_inputs(viz, (first, second), "--viz picture")
        _match_two(
            Path(first),
            Path(second),
            ratio_v,
            mutual,
            device,
            viz,
            geometry,
            method,
            weights,
            batch_size,
            max_keypoints,
            resize_max,
            upright,
            mr_size,
            precision,
            detector,
            frames,
            size_pool,
        )
        return
    from .h5 import Reader
    from .match import match
    from .pairs import pairs_for

    if viz is not None:
        raise DescmatchError("--viz applies to two-image mode (descmatch match A.jpg B.jpg)")
    pairs_file = (Path(pairs),) if Path(pairs).is_file() else ()
    with Reader(first, "features") as r:
        names = sorted(r.keys)
    pair_list = pairs_for(pairs, names, first)
    with _progress("match") as cb:
        res = match(
            first,
            pair_list,
            second,
            ratio_v,
            mutual,
            _device(device),
            overwrite,
            pairs_out,
            progress=cb,
            inputs=pairs_file,
        )
    mean = res.matches_total / res.matched if res.matched else 0.0
    _say(
        f"{res.path}: {res.matched} pair(s) matched in {res.seconds:.1f} s, "
        f"{mean:,.0f} matches/pair; {res.skipped} already done; pairs in {res.pairs_path}"
    )


def _match_two(
    a: Path,
    b: Path,
    ratio: float | None,
    mutual: bool,
    device: str,
    viz: Path | None,
    geometry: Geometry,
    method: Method,
    weights: str | None,
    batch_size: int | None,
    max_keypoints: int,
    resize_max: int | None,
    upright: bool,
    mr_size: float | None,
    precision: str,
    detector: DetectorName,
    frames: str,
    size_pool: str,
) -> None:
    from .two_view import match_images

    det, describer = _setup(
        method,
        weights,
        device,
        batch_size,
        max_keypoints,
        upright,
        mr_size,
        precision,
        detector,
        frames,
        size_pool,
    )
    res = match_images(
        a, b, det, describer, ratio, mutual, geometry.value, _device(device), resize_max
    )
    _say(
        f"{a.name} ({len(res.keypoints0)} keypoints) - {b.name} ({len(res.keypoints1)} "
        f"keypoints), {res.describer}: {len(res.matches)} matches, {int(res.inliers.sum())} "
        f"inliers ({geometry.value}), {res.seconds:.1f} s"
    )
    if viz is not None:
        res.draw(viz)
        _say(f"wrote {viz}")


@app.command("train")
def train_cmd(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="Net to train: l2net, "
            "l2net-cs, hardnet, sosnet, sosnet-cs, or frames (the keypoint frame "
            "refiner: photos sources only; takes --steps, --batch-size, --lr, "
            "--seed, --device, --eval-every, --checkpoint-every, --resume, "
            "--time-limit, --init, --max-tilt, --pair-angle, --pair-scale, "
            "--pairs-per-image, --max-images, --frame-loss, --teacher, --rotation, "
            "--width, --mean-weight, --covariant-weight; "
            "default lr 1e-3).",
        ),
    ] = "hardnet",
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Training data, repeatable: "
            "[photos|multiview|hpatches|pool|brown:]PATH[@WEIGHT] (photos: "
            "self-supervised; multiview: scenes with cameras.txt; hpatches: "
            "sequences with images 1..N and H_1_i).",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Run folder: pools, "
            "checkpoint.pt, logs and the final <method>.pt (default "
            "runs/<method>).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")] = 10000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=2, help="Pairs (points) per batch.")
    ] = 512,
    loss: Annotated[
        str | None,
        typer.Option(
            "--loss",
            help="l2net, hardnet, sosnet, contrastive, triplet (default: the method's own).",
        ),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help="sgd or adam (default: the method's own).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="Learning rate (default: the method's own), decayed linearly to 0."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision", help="auto (bf16 where the CPU has it, AMP on CUDA), bf16, fp16, fp32."
        ),
    ] = "auto",
    val: Annotated[
        str | None,
        typer.Option(
            "--val",
            help="Validation: brown:PATH, pool:PATH, "
            "none (default: 5% of the first source's photos held out).",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every", help="Steps between validation FPR95 (default: once per epoch)."
        ),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 500,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")
    ] = False,
    time_limit: Annotated[
        float | None,
        typer.Option(
            "--time-limit",
            help="Stop cleanly after this many seconds (checkpoint and weights written).",
        ),
    ] = None,
    mr_size: Annotated[
        float,
        typer.Option(
            "--mr-size", help="Patch window of the training patches, recorded in the weights."
        ),
    ] = DEFAULT_MR_SIZE,
    pairs_per_image: Annotated[int, typer.Option("--pairs-per-image")] = 512,
    max_images: Annotated[
        int | None, typer.Option("--max-images", help="Use at most this many photos per source.")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes generating training pairs.")
    ] = 1,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="Batch composition: same-image "
            "(few photos x many points), random (HardNet: uniform over the pool), "
            "progressive (L2-Net), hard-negative (points close in descriptor "
            "space, mined with the current net).",
        ),
    ] = "same-image",
    p1_fraction: Annotated[
        float,
        typer.Option(
            "--p1-fraction",
            min=0.0,
            max=1.0,
            help="progressive: share of a batch walking the shuffled sequence.",
        ),
    ] = 0.5,
    mine_every: Annotated[
        int,
        typer.Option(
            "--mine-every", min=1, help="hard-negative: steps between descriptor updates."
        ),
    ] = 1000,
    mine_points: Annotated[
        int,
        typer.Option(
            "--mine-points",
            min=2,
            help="hard-negative: random points per source described at each update.",
        ),
    ] = 32768,
    mine_group: Annotated[
        int,
        typer.Option(
            "--mine-group",
            min=0,
            help="hard-negative: points per group of neighbours (0: the whole batch).",
        ),
    ] = 64,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start from these weights (a "
            "file or shipped name of the same method) instead of random ones: "
            "fine-tuning.",
        ),
    ] = None,
    max_tilt: Annotated[
        float,
        typer.Option(
            "--max-tilt",
            min=1.0,
            help="Photo sources: add "
            "random camera tilts (affine foreshortening) up to this factor to the "
            "homographies (1 = none).",
        ),
    ] = 1.0,
    pair_angle: Annotated[
        float,
        typer.Option(
            "--pair-angle",
            help="Photo and HPatches "
            "sources: a detected keypoint pairs with a mapped one whose "
            "orientation is at most this many degrees away.",
        ),
    ] = 30.0,
    pair_scale: Annotated[
        float,
        typer.Option(
            "--pair-scale",
            help="Photo and HPatches "
            "sources: the largest ratio between the sizes of a detected and a "
            "mapped keypoint that pair.",
        ),
    ] = 1.2,
    frames: Annotated[
        str | None,
        typer.Option(
            "--frames",
            help="Descriptor nets: cut the "
            "photo and multiview training patches in the refined frames of this "
            "frame net (a file or shipped name, e.g. frames), as --frames cuts "
            "them at inference.",
        ),
    ] = None,
    frame_loss: Annotated[
        str,
        typer.Option(
            "--frame-loss",
            help="--method frames: "
            "covariant (refined frames of each pair map onto each other) or "
            "descriptor (the hardest-in-batch loss of a frozen --teacher "
            "descriptor on patches cut in the refined frames, negatives held "
            "constant).",
        ),
    ] = "covariant",
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="--frame-loss descriptor: "
            "the frozen descriptor net (a file or shipped name, e.g. "
            "sosnet-cs).",
        ),
    ] = None,
    rotation: Annotated[
        bool,
        typer.Option(
            "--rotation",
            help="--method frames: learn a rotation of the frame too (default: scale only).",
        ),
    ] = False,
    width: Annotated[
        int | None,
        typer.Option(
            "--width",
            min=1,
            help="--method frames: "
            "channels of the frame net's first layers (default 16; the net's cost "
            "grows with its square).",
        ),
    ] = None,
    covariant_weight: Annotated[
        float,
        typer.Option(
            "--covariant-weight",
            min=0.0,
            help="--frame-loss descriptor: add the covariant loss with this weight.",
        ),
    ] = 0.0,
    mean_weight: Annotated[
        float,
        typer.Option(
            "--mean-weight",
            min=0.0,
            help="--method "
            "frames: weight of the penalty on the batch's mean rotation and "
            "log scale (keeps the refinement free of one global turn or "
            "rescaling).",
        ),
    ] = 1.0,
    teacher_size_pool: Annotated[
        str,
        typer.Option(
            "--teacher-size-pool",
            help="--frame-loss "
            "descriptor: the teacher's descriptors size-pooled over "
            "these factors, as --size-pool describes (none: one "
            "patch).",
        ),
    ] = "none",
) -> None:
    """Train a descriptor net (L2-Net, HardNet, SOSNet objectives) with checkpoints and
    validation FPR95; writes <out>/<method>.pt, loadable with --weights.

    Data-parallel in several processes (DistributedDataParallel; gloo on the CPU,
    NCCL on CUDA with one GPU per process, cuda:LOCAL_RANK):

      torchrun --nproc_per_node 2 -m descmatch train --data ... --out ...

    --batch-size is the global batch: each process trains on its share of it.
    Rank 0 alone builds pools, validates, logs and writes; --resume is exact
    with the same number of processes."""

    from .train.descriptors import TrainConfig, train

    if not data:
        raise DescmatchError("--data is required (e.g. --data photos:shared/data/photos)")
    if method != "frames" and (
        frame_loss != "covariant"
        or teacher is not None
        or rotation
        or mean_weight != 1.0
        or covariant_weight
        or width
        or teacher_size_pool != "none"
    ):
        raise DescmatchError(
            "--frame-loss, --teacher, --rotation, --width, --mean-weight, "
            "--covariant-weight and --teacher-size-pool apply to --method "
            "frames"
        )
    if method == "frames":
        from .describe import resolve_size_pool
        from .train.frames import FramesConfig, train_frames

        if frames is not None:
            raise DescmatchError("--frames applies to descriptor nets, not to --method frames")
        fcfg = FramesConfig(
            data=list(data),
            out_dir=out_dir or Path("runs") / method,
            steps=steps,
            batch_size=batch_size,
            lr=lr or 1e-3,
            seed=seed,
            device=str(_device(device)),
            max_tilt=max_tilt,
            pair_angle=pair_angle,
            pair_scale=pair_scale,
            pairs_per_image=pairs_per_image,
            max_images=max_images,
            eval_every=eval_every or 500,
            checkpoint_every=checkpoint_every,
            resume=resume,
            time_limit_s=time_limit,
            init=init,
            objective=frame_loss,
            teacher=teacher,
            net_conf={
                **({"rotation": True} if rotation else {}),
                **({"width": width} if width else {}),
            },
            mean_weight=mean_weight,
            covariant_weight=covariant_weight,
            teacher_size_pool=resolve_size_pool(teacher_size_pool),
            command="descmatch " + " ".join(sys.argv[1:]),
            precision="fp32" if precision == "auto" else precision,
        )
        with _progress("train frames") as cb:
            path = train_frames(fcfg, progress=cb)
        _say(f"wrote {path}")
        return
    cfg = TrainConfig(
        method=method,
        data=list(data),
        out_dir=out_dir or Path("runs") / method,
        steps=steps,
        batch_size=batch_size,
        loss=loss,
        optimizer=optimizer,
        lr=lr,
        seed=seed,
        device=str(_device(device)),
        precision=precision,
        val=val,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        resume=resume,
        time_limit_s=time_limit,
        mr_size=mr_size,
        pairs_per_image=pairs_per_image,
        max_images=max_images,
        pool_workers=workers,
        sampler=sampler,
        p1_fraction=p1_fraction,
        mine_every=mine_every,
        mine_points=mine_points,
        mine_group=mine_group or None,
        init=init,
        max_tilt=max_tilt,
        pair_max_angle=pair_angle,
        pair_max_scale=pair_scale,
        frames=frames,
        command="descmatch " + " ".join(sys.argv[1:]),
    )
    with _progress(f"train {method}") as cb:
        path = train(cfg, progress=cb)
    _say(f"wrote {path}")


eval_app = typer.Typer(
    help="Evaluate descriptors: patch verification and homography pairs.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")


@eval_app.command("homography")
def eval_homography(
    sequences: Annotated[
        list[Path],
        typer.Argument(help="HPatches-style folders: images 1..6 and H_1_i homographies."),
    ],
    method: MethodOpt = Method.auto,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    max_keypoints: MaxKptsOpt = 4000,
    upright: UprightOpt = False,
    detector: DetectorOpt = DetectorName.sift,
    mr_size: MrOpt = None,
    precision: PrecisionOpt = DEFAULT_PRECISION,
    frames: FramesOpt = "auto",
    size_pool: SizePoolOpt = "auto",
    ratio: Annotated[
        float,
        typer.Option(
            "--ratio",
            callback=_ratio_in_range,
            help="Ratio test (1 = none: the protocol is mutual nearest neighbours alone).",
        ),
    ] = 1.0,
    mutual: MutualOpt = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the rows as JSON.")
    ] = None,
) -> None:
    """Matches, correct matches and MMA at 1/2/3/5/10 px under the true homography, and the
    RANSAC homography's accuracy (mean corner error within 1/3/5 px), for pairs 1-i."""
    import json

    from .evaluate import THRESHOLDS, evaluate_homography

    detector, describer = _setup(
        method,
        weights,
        device,
        batch_size,
        max_keypoints,
        upright,
        mr_size,
        precision,
        detector,
        frames,
        size_pool,
    )
    rows = []
    for seq in sequences:
        rows += evaluate_homography(
            seq, describer, detector, None if ratio >= 1 else ratio, mutual, _device(device)
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
        title=f"{describer.name}, {max_keypoints} keypoints",
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
                    "max_keypoints": max_keypoints,
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
def eval_epipolar(
    scenes: Annotated[
        list[Path],
        typer.Argument(help="Scene folders with cameras.txt and images/ (Strecha format)."),
    ],
    method: MethodOpt = Method.auto,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    max_keypoints: MaxKptsOpt = 4000,
    upright: UprightOpt = False,
    detector: DetectorOpt = DetectorName.sift,
    mr_size: MrOpt = None,
    precision: PrecisionOpt = DEFAULT_PRECISION,
    frames: FramesOpt = "auto",
    size_pool: SizePoolOpt = "auto",
    ratio: Annotated[
        float, typer.Option("--ratio", callback=_ratio_in_range, help="Ratio test (1 = none).")
    ] = 1.0,
    mutual: MutualOpt = True,
    threshold: Annotated[
        float,
        typer.Option("--threshold", help="Correct: symmetric epipolar distance under this (px)."),
    ] = 2.0,
) -> None:
    """Matches of consecutive images and how many agree with the true cameras (epipolar
    distance under --threshold px)."""
    from .evaluate import evaluate_epipolar

    detector, describer = _setup(
        method,
        weights,
        device,
        batch_size,
        max_keypoints,
        upright,
        mr_size,
        precision,
        detector,
        frames,
        size_pool,
    )
    rows = []
    for scene in scenes:
        rows += evaluate_epipolar(
            scene,
            describer,
            detector,
            None if ratio >= 1 else ratio,
            mutual,
            _device(device),
            threshold,
        )
    table = Table(
        "scene",
        "pair",
        "matches",
        "correct",
        "precision",
        title=f"{describer.name}, {max_keypoints} keypoints, epipolar < {threshold:g} px",
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
    from .train.brown import BrownDataset
    from .train.evaluation import evaluate_fpr95
    from .weights import load_net

    loaded = load_net(method, weights)
    ds = BrownDataset(dataset, patch_size=loaded.net.patch_size)
    res = evaluate_fpr95(loaded.net, ds, _device(device), batch_size or 1024, pairs)
    out.print(
        f"{dataset.name}: {method} ({loaded.path.name}) FPR95 {100 * res['fpr95']:.2f}% "
        f"on {res['num_pairs']:,} pairs ({res['num_matches']:,} matching)",
        highlight=False,
    )


weights_app = typer.Typer(
    help="List the shipped weights (name, net, training data, sha256, headline metric); "
    "`weights import` converts published weight files.",
)
app.add_typer(weights_app, name="weights")


@weights_app.callback(invoke_without_command=True)
def weights_cmd(ctx: typer.Context) -> None:
    """List the shipped weights: name, net, training data, sha256, headline metric."""
    if ctx.invoked_subcommand is not None:
        return
    from .weights import default_method, list_weights, weights_dir

    items = list_weights()
    if not items:
        _say(
            f"no trained weights ship in {weights_dir()}: --method auto uses rootsift. "
            "Train with `descmatch train --method hardnet`."
        )
        return
    default = default_method()
    table = Table("name", "net", "trained on", "sha256", "headline", title=str(weights_dir()))
    for w in items:
        mark = " (default)" if w.name == default else ""
        table.add_row(w.name + mark, w.net, w.data, w.sha256[:16], w.metric)
    out.print(table)


@weights_app.command("import")
def weights_import_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="A published weight file: HardNet's (DagnyT/hardnet), SOSNet's (the 32x32 "
            "model) or a state dict saved from kornia's HardNet or SOSNet."
        ),
    ],
    net: Annotated[str, typer.Option("--net", help="The net the file holds: hardnet or sosnet.")],
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="Checkpoint to write (default: weights/NET-<file name>.pt)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing checkpoint.")
    ] = False,
) -> None:
    """Convert a published weight file into a descmatch checkpoint for --weights (read as
    tensors only; records the file's name and sha256)."""
    from .weights_import import import_weights

    path = import_weights(source, net, out_path, overwrite)
    _say(f"wrote {path}: {net} from {source.name}; use it with --method {net} --weights {path}")


@app.command("examples")
def examples_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder to copy the example images into.")],
) -> None:
    """Copy the example images that ship with descmatch (a synthetic scene, 3 views)."""
    from .examples import copy_examples

    files = copy_examples(folder)  # OutputError: a file in the way, or not writable
    n = sum(1 for f in files if not f.name.startswith("H_"))
    _say(
        f"{folder}: {n} example images and {len(files) - n} homographies (H_1_i: view-1 "
        "pixels to view-i pixels)"
    )


# -- structure from motion ------------------------------------------------------------------
class CameraMode(str, Enum):
    single = "single"
    per_image = "per-image"


class ColmapVersion(str, Enum):
    v3 = "3"
    v4 = "4"


def _is_features_file(spec: str) -> bool:
    p = Path(spec)
    return p.is_file() and p.suffix.lower() in (".h5", ".hdf5")


@app.command("pairs")
def pairs_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="features.h5 (needed for --retrieval and "
            "--loop-closure), or images: folder, glob, image list."
        ),
    ],
    output: Annotated[Path, typer.Argument(help="Pairs file to write ('name0 name1' lines).")],
    exhaustive: Annotated[
        bool, typer.Option("--exhaustive", help="Every image with every other (the default).")
    ] = False,
    sequential: Annotated[
        int | None,
        typer.Option("--sequential", min=1, help="Each image with its next K in name order."),
    ] = None,
    loop_closure: Annotated[
        int,
        typer.Option(
            "--loop-closure",
            min=0,
            help="With "
            "--sequential: add the N most similar images outside the "
            "window per image (retrieval).",
        ),
    ] = 0,
    retrieval: Annotated[
        int | None,
        typer.Option(
            "--retrieval",
            min=1,
            help="Each image with its K most similar others (VLAD of its descriptors).",
        ),
    ] = None,
    words: Annotated[
        int,
        typer.Option(
            "--words",
            min=1,
            max=1024,
            help="Retrieval: k-means codebook size, learned on the collection (at most 1024, "
            "and one word per 16 sampled descriptors).",
        ),
    ] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Retrieval: codebook seed.")] = 0,
) -> None:
    """Choose the image pairs to match: exhaustive, sequential (with retrieval loop closure)
    or by image retrieval (VLAD over a k-means codebook of the collection's own descriptors).
    """
    from .h5 import Reader
    from .images import list_images
    from .pairs import exhaustive as all_pairs
    from .pairs import retrieval as retrieval_pairs
    from .pairs import sequential_with_loops, write_pairs

    chosen = sum([exhaustive, sequential is not None, retrieval is not None])
    if chosen > 1:
        raise InputError("choose one of --exhaustive, --sequential K, --retrieval K")
    if loop_closure and sequential is None:
        raise InputError("--loop-closure goes with --sequential K")
    features = source if _is_features_file(source) else None
    if features is not None:
        with Reader(features, "features") as r:
            names = sorted(r.keys)
    else:
        names = list_images(source).names
    needs = "--retrieval" if retrieval is not None else "--loop-closure" if loop_closure else ""
    if needs and features is None:
        raise InputError(
            f"{source}: {needs} needs a features.h5 with descriptors (descmatch "
            "extract IMAGES features.h5)"
        )
    if retrieval is not None:
        assert features is not None
        pairs = retrieval_pairs(features, retrieval, names, words=words, seed=seed)
        how = f"retrieval, {retrieval} per image"
    elif sequential is not None:
        pairs = sequential_with_loops(names, sequential, loop_closure, features, seed)
        how = f"sequential {sequential}" + (
            f" + {loop_closure} loop closures per image" if loop_closure else ""
        )
    else:
        pairs = all_pairs(names)
        how = "exhaustive"
    write_pairs(output, pairs)
    _say(f"{output}: {len(pairs)} pairs of {len(names)} images ({how})")


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
    from .export.colmap import LAYOUT_HINT, export_colmap, require_pycolmap
    from .images import list_images
    from .pairs import read_pairs

    require_pycolmap()
    imgs = list_images(images)
    pair_list = read_pairs(pairs, set(imgs.names)) if pairs is not None else None
    with _progress("export colmap") as cb:
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
    _say(
        f"{database}: {res.images} images, {res.cameras} camera(s), {res.pairs} pairs "
        f"({res.matches:,} matches), {res.verified_pairs} pairs with a two-view geometry "
        f"({res.inlier_matches:,} inliers{', not verified' if not verify else ''}) in "
        f"{res.seconds:.1f} s{skipped}; {LAYOUT_HINT[colmap_version.value]}"
    )


@contextmanager
def _stage_progress() -> Iterator[Callable[[str, int, int, str], None]]:
    if _state["quiet"] or not err.is_terminal:
        yield lambda stage, i, n, name: None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[name]}"),
        console=err,
        transient=True,
    )
    task = bar.add_task("sfm", total=None, name="")
    with bar:

        def update(stage: str, i: int, n: int, name: str) -> None:
            bar.update(task, description=stage, completed=i, total=n, name=name[-40:])

        yield update


@app.command("sfm")
def sfm_cmd(
    images: Annotated[str, typer.Argument(help="Folder (recursive), glob, image list.")],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Output folder: features.h5, pairs.txt, matches.h5, database.db, sparse/0."
        ),
    ],
    pairs: Annotated[
        str,
        typer.Option(
            "--pairs",
            help="exhaustive, sequential:K, "
            "sequential:K+loops:N (with retrieval loop closure), retrieval:K, or "
            "a pairs file.",
        ),
    ] = "exhaustive",
    method: MethodOpt = Method.auto,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    max_keypoints: MaxKptsOpt = 4000,
    resize_max: ResizeOpt = None,
    max_pixels: MaxPixelsOpt = "25M",
    upright: UprightOpt = False,
    mr_size: MrOpt = None,
    precision: PrecisionOpt = DEFAULT_PRECISION,
    frames: FramesOpt = "auto",
    size_pool: SizePoolOpt = "auto",
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
) -> None:
    """Structure from motion: extract, pairs, match, export to a COLMAP database and
    incremental mapping (pycolmap) into OUT_DIR/sparse/0; each stage resumes from its files.
    Needs pycolmap: pip install 'descmatch\\[sfm]'."""
    from .export.colmap import require_pycolmap
    from .images import list_images, parse_max_pixels
    from .sfm import SfmConfig, Stage, run_sfm

    require_pycolmap()
    imgs = list_images(images, parse_max_pixels(max_pixels))
    if cameras is not None and not cameras.is_file():
        raise InputError(f"{cameras}: no such cameras file")
    detector, describer = _setup(
        method,
        weights,
        device,
        batch_size,
        max_keypoints,
        upright,
        mr_size,
        precision,
        frames=frames,
        size_pool=size_pool,
    )
    cfg = SfmConfig(
        pairs=pairs,
        camera_mode=camera_mode.value,
        verify=verify,
        ratio=None if ratio >= 1.0 else ratio,
        mutual=mutual,
        max_side=resize_max,
        device=_device(device),
        num_threads=threads,
        seed=seed,
        min_model_size=min_model_size,
        overwrite=overwrite,
        colmap_log=logging.getLogger().level <= logging.DEBUG,
    )

    def stage_line(s: Stage) -> None:
        _say(f"{s.name:<8} {s.seconds:7.1f} s  {'(done before) ' if s.skipped else ''}{s.note}")

    with _stage_progress() as cb:
        res = run_sfm(
            imgs, out_dir, detector, describer, cfg, cameras, progress=cb, on_stage=stage_line
        )
    _say(
        f"{res.model_path}: {res.registered}/{res.images} images registered, "
        f"{res.points3d:,} 3D points, mean track length {res.mean_track_length:.2f}, "
        f"mean reprojection error {res.mean_reprojection_error:.3f} px"
        + (f" ({res.models} models)" if res.models > 1 else "")
        + f"; {res.seconds:.1f} s in all"
    )
    if res.unregistered:
        _say(
            f"not registered: {', '.join(res.unregistered[:10])}"
            + (f" and {len(res.unregistered) - 10} more" if len(res.unregistered) > 10 else "")
        )
    pe = res.pose_errors
    if pe is not None:
        _say(
            f"relative pose errors vs {cameras} ({pe.pairs} pairs of {pe.registered}/"
            f"{pe.cameras} cameras): rotation median {pe.rotation_median:.3f} deg, mean "
            f"{pe.rotation_mean:.3f} deg; translation direction median "
            f"{pe.translation_median:.3f} deg, mean {pe.translation_mean:.3f} deg; "
            f"{100 * pe.within_5deg:.0f}% of pairs within 5 deg"
        )


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _interrupted() -> None:
    err.print(
        "interrupted: finished work is saved; run the same command to resume",
        highlight=False,
        markup=False,
    )
    sys.exit(130)


_GLOBAL_FLAGS = ("--quiet", "-q", "--verbose", "-v")


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Accept --quiet/--verbose after the command too (descmatch extract ... --quiet)."""
    if "--" in argv:
        return argv
    flags = [a for a in argv if a in _GLOBAL_FLAGS]
    return flags + [a for a in argv if a not in _GLOBAL_FLAGS]


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        rv = app(args=_hoist_global_flags(sys.argv[1:]), standalone_mode=False)
    except DescmatchError as e:
        err.print(Text("error: ", style="red") + Text(str(e)), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        _interrupted()
    except Exception as e:
        # Usage errors (click's exceptions, bundled by typer) know how to show themselves.
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            sys.exit(code)
        raise
    if rv == 130:  # typer turns KeyboardInterrupt into an exit code of 130
        _interrupted()
    if isinstance(rv, int) and rv:
        sys.exit(rv)
