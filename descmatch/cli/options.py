"""Options that several commands share, declared once.

:class:`PipelineOptions` holds the detector, describer and image-reading options; the
:func:`pipeline_options` decorator adds them to a command's signature (so Typer shows them
in ``--help``) and hands the command one ``opts`` object instead of a dozen arguments.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..describe import DEFAULT_PRECISION, method_choices
from ..detect import DETECTORS
from ..patches import DEFAULT_MR_SIZE

# Choices come from the registries. Typer takes choices as an Enum, so the Enums are made
# from the registries' names (mypy cannot see members of an Enum built at run time).
#: --method: ``auto`` and every registered method (classical and learned nets)
MethodName = Enum(  # type: ignore[misc]
    "MethodName", [(n, n) for n in dict.fromkeys(("auto", *method_choices()))], type=str
)
#: --detector: the detector registry
DetectorName = Enum("DetectorName", [(n, n) for n in DETECTORS], type=str)  # type: ignore[misc]


class Geometry(str, Enum):
    fundamental = "fundamental"
    homography = "homography"


# -- option types used by one or a few commands -----------------------------------------------
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--weights",
        "-w",
        help="A checkpoint of your own (or a shipped weights name) for a learned method.",
    ),
]
BatchOpt = Annotated[
    int | None,
    typer.Option(
        "--batch-size",
        min=1,
        help="Patches per net call (default: 256 on the CPU, where it is fastest, 2048 on CUDA).",
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
HalfOpt = Annotated[bool, typer.Option("--half", help="Store descriptors as float16.")]
PAIRS_HELP = (
    "exhaustive, sequential:K, sequential:K+loops:N (retrieval loop closure), retrieval:K, "
    "or a pairs file (one 'name0 name1' per line)."
)


def ratio_in_range(value: float) -> float:
    """--ratio: 0 < ratio <= 1 (0 would keep no match, above 1 is no test at all)."""
    if not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value:g} is not in (0, 1]: 1 disables the ratio test")
    return value


RatioOpt = Annotated[
    float,
    typer.Option(
        "--ratio",
        callback=ratio_in_range,
        help="Lowe's ratio test threshold on L2 distances, in (0, 1] (1 disables it).",
    ),
]
MutualOpt = Annotated[
    bool, typer.Option("--mutual/--no-mutual", help="Keep only mutual nearest neighbours.")
]


# -- the pipeline options ---------------------------------------------------------------------
@dataclass
class PipelineOptions:
    """Detector, describer and image-reading options, as the command line gave them."""

    method: str = "auto"
    weights: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    detector: str = "sift"
    max_keypoints: int = 4000
    upright: bool = False
    mr_size: float | None = None
    precision: str = DEFAULT_PRECISION
    frames: str = "auto"
    size_pool: str = "auto"
    resize_max: int | None = None
    max_pixels: str = "25M"

    def torch_device(self) -> Any:
        from ..device import resolve_device

        return resolve_device(self.device)

    def build_detector(self) -> Any:
        from ..detect import build_detector

        extra = {"device": str(self.torch_device())} if self.detector == "dog" else {}
        return build_detector(
            self.detector, max_keypoints=self.max_keypoints, upright=self.upright, **extra
        )

    def build(self) -> tuple[Any, Any]:
        """The detector and describer these options name."""
        from ..describe import SiftDescriber, build_describer
        from ..errors import ConfigError

        describer = build_describer(
            self.method,
            self.weights,
            self.torch_device(),
            self.batch_size,
            self.mr_size,
            self.precision,
            self.frames,
            self.upright,
            self.size_pool,
        )
        if self.detector == "dog" and isinstance(describer, SiftDescriber):
            raise ConfigError(
                f"--detector dog: {describer.name} needs OpenCV's SIFT scale space; "
                "use --detector sift, or a learned --method"
            )
        return self.build_detector(), describer

    def max_pixel_count(self) -> int | None:
        from ..images import parse_max_pixels

        return parse_max_pixels(self.max_pixels)


_OPTIONS: dict[str, tuple[Any, Any]] = {
    "method": (
        Annotated[
            MethodName,
            typer.Option(
                "--method",
                "-m",
                help="Descriptor: auto is the shipped default net (RootSIFT while no trained "
                "weights ship).",
            ),
        ],
        MethodName("auto"),
    ),
    "weights": (WeightsOpt, None),
    "device": (DeviceOpt, "auto"),
    "batch_size": (BatchOpt, None),
    "detector": (
        Annotated[
            DetectorName,
            typer.Option(
                "--detector",
                help="sift: OpenCV's DoG detector (CPU); dog: the same detector in torch on "
                "--device (the GPU path; learned descriptors only).",
            ),
        ],
        DetectorName("sift"),
    ),
    "max_keypoints": (
        Annotated[
            int,
            typer.Option("--max-keypoints", min=0, help="Keep the strongest keypoints (0 = all)."),
        ],
        4000,
    ),
    "upright": (
        Annotated[
            bool,
            typer.Option(
                "--upright",
                help="Skip orientation: patches are not rotated (one keypoint per location).",
            ),
        ],
        False,
    ),
    "mr_size": (
        Annotated[
            float | None,
            typer.Option(
                "--mr-size",
                min=0.5,
                help="Patch window side in keypoint sizes (default: the weights' own, else "
                f"{DEFAULT_MR_SIZE:g}).",
            ),
        ],
        None,
    ),
    "precision": (
        Annotated[
            str,
            typer.Option(
                "--precision",
                help="Learned nets: fp32 (reference), bf16, fp16 (CUDA), int8 (CPU, ONNX "
                "Runtime), or auto (fp16 on CUDA, bf16 on CPUs that have it).",
            ),
        ],
        DEFAULT_PRECISION,
    ),
    "frames": (
        Annotated[
            str,
            typer.Option(
                "--frames",
                help="Learned methods: refine the detector's keypoint scale and orientation "
                "with this frame net first (auto: the shipped weights/frames.pt where there "
                "is one; none: the detector's frames; or a file or shipped name).",
            ),
        ],
        "auto",
    ),
    "size_pool": (
        Annotated[
            str,
            typer.Option(
                "--size-pool",
                help="Learned methods: describe each keypoint as the normalised sum of its "
                "descriptors at these factors of its size (domain-size pooling, e.g. "
                "0.8,1.25; one net pass per factor; auto: the default; none: one patch).",
            ),
        ],
        "auto",
    ),
    "resize_max": (
        Annotated[
            int | None,
            typer.Option(
                "--resize-max",
                min=16,
                help="Downscale images so the longer side is at most this.",
            ),
        ],
        None,
    ),
    "max_pixels": (
        Annotated[
            str,
            typer.Option(
                "--max-pixels",
                help="Images above this size (pixels, or megapixels as 50M; none: no limit) "
                "are read at 1/2, 1/4 or 1/8 size; keypoints stay in the images' own pixels.",
            ),
        ],
        "25M",
    ),
}
assert set(_OPTIONS) == {f.name for f in fields(PipelineOptions)}

#: option groups a command can take
DETECT = ("detector", "max_keypoints", "upright", "device")
DESCRIBE = ("method", "weights", "batch_size", "mr_size", "precision", "frames", "size_pool")
READ = ("resize_max", "max_pixels")

F = TypeVar("F", bound=Callable[..., Any])


def pipeline_options(*groups: tuple[str, ...]) -> Callable[[F], F]:
    """Add the options of ``groups`` to a command whose last parameter is
    ``opts: PipelineOptions``; the command receives them packed in ``opts``."""
    names = [n for g in groups for n in g]

    def decorate(fn: F) -> F:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]
        taken = {p.name for p in own}
        shared = [
            inspect.Parameter(
                n, inspect.Parameter.KEYWORD_ONLY, annotation=_OPTIONS[n][0], default=_OPTIONS[n][1]
            )
            for n in names
            if n not in taken
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {n: kwargs.pop(n) for n in names if n in kwargs}
            for key, value in values.items():
                if isinstance(value, Enum):
                    values[key] = value.value
            return fn(opts=PipelineOptions(**values), **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
        command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        return command  # type: ignore[return-value]

    return decorate


def image_list(images: str, opts: PipelineOptions) -> Any:
    """The images named on the command line, read under ``--max-pixels``."""
    from ..images import list_images

    return list_images(images, opts.max_pixel_count())


def refuse_list_file(output: Path, images: str) -> None:
    """The output must not be the text file that lists the images (extract refuses an
    output that is one of the images itself)."""
    from ..outputs import refuse_inputs

    if Path(images).is_file():
        refuse_inputs(output, (images,), "features file")
