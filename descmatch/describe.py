"""Describers: turn an image and its keypoints into descriptors.

Classical SIFT and RootSIFT (OpenCV's descriptor on the same keypoints) and the learned nets
(patches cut in one batched call, the net run in chunks on the device) share one interface,
so every method goes through the same pipeline and files.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
import torch

from .detect import Keypoints, SiftDetector, to_uint8
from .errors import ConfigError, WeightsError
from .int8 import Int8Net, cpu_has_int8_dot, int8_path, onnxruntime_available
from .netdescriber import DEFAULT_PRECISION as DEFAULT_PRECISION
from .netdescriber import PRECISIONS as PRECISIONS
from .netdescriber import NetDescriber as NetDescriber
from .netdescriber import check_size_pool as check_size_pool
from .netdescriber import resolve_precision as resolve_precision
from .nets import NETS
from .patches import DEFAULT_MR_SIZE
from .weights import LoadedNet, default_method, load_net, sha256, weights_dir

log = logging.getLogger(__name__)

CLASSICAL = ("sift", "rootsift")


class Describer(Protocol):
    name: str
    dim: int
    meta: dict[str, Any]

    def __call__(self, image: np.ndarray, kps: Keypoints) -> np.ndarray:
        """Shape: image (H,W) float32 [0,1], N keypoints -> (N,D) float32."""
        ...


class SiftDescriber:
    """OpenCV's SIFT descriptor, L2-normalised (``root``: RootSIFT, Arandjelovic'12)."""

    dim = 128

    def __init__(self, root: bool = False) -> None:
        self.root = root
        self.name = "rootsift" if root else "sift"
        self.meta: dict[str, Any] = {"weights": "", "weights_sha256": ""}

    def __call__(self, image: np.ndarray, kps: Keypoints) -> np.ndarray:
        if len(kps) == 0:
            return np.zeros((0, 128), np.float32)
        if kps.cv is None:
            raise ValueError("SIFT descriptors need the detector's OpenCV keypoints")
        det = kps.detector if isinstance(kps.detector, SiftDetector) else SiftDetector()
        _, desc = det.make_cv().compute(to_uint8(image), list(kps.cv))
        if desc is None or desc.shape[0] != len(kps):
            raise RuntimeError("OpenCV SIFT dropped keypoints while describing")
        d = desc.astype(np.float32)
        if self.root:
            d /= np.maximum(d.sum(1, keepdims=True), 1e-8)
            d = np.sqrt(d)
        else:
            d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-8)
        return d


def method_choices() -> list[str]:
    return ["auto", *CLASSICAL, *NETS]


def resolve_method(method: str) -> str:
    """``auto`` is the shipped default net (weights/DEFAULT), else RootSIFT."""
    if method == "auto":
        return default_method() or "rootsift"
    if method not in CLASSICAL and method not in NETS:
        raise ConfigError(f"--method {method}: choose one of {', '.join(method_choices())}")
    return method


def default_batch_size(device: torch.device, precision: str = "auto") -> int:
    """Patches per net call: 256 on the CPU (measured with benchmarks/speed.py: it beats 1024
    by 1.8x in bf16, cache-sized activations), 64 for int8 there (benchmarks/extract_cost.py:
    5-15% less CPU time than 256), 2048 on CUDA."""
    if device.type == "cuda":
        return 2048
    return 64 if precision == "int8" else 256


FRAMES_AUTO = "auto"


def resolve_frames(frames: str | None) -> str | None:
    """The frame refiner weights a learned describer uses: ``auto`` the shipped
    ``weights/frames.pt`` where there is one, ``none`` (or None) no refiner, else a file or
    shipped name."""
    if frames is None or frames == "none":
        return None
    if frames == FRAMES_AUTO:
        return "frames" if (weights_dir() / "frames.pt").is_file() else None
    return frames


SIZE_POOL_AUTO = "auto"
#: The factors ``--size-pool auto`` pools over (chosen on the dev sets: README, Measurements).
DEFAULT_SIZE_POOL: tuple[float, ...] = (0.7, 1.4)


def resolve_size_pool(spec: str | None) -> tuple[float, ...]:
    """``--size-pool``: ``auto`` :data:`DEFAULT_SIZE_POOL`, ``none`` (or None) one patch
    (1.0,), else comma-separated size factors such as ``0.8,1.25``."""
    if spec is None or spec == "none":
        return (1.0,)
    if spec == SIZE_POOL_AUTO:
        return DEFAULT_SIZE_POOL
    try:
        factors = tuple(float(f) for f in spec.split(","))
    except ValueError:
        raise ConfigError(
            f"--size-pool {spec}: expected auto, none or comma-separated size "
            "factors between 0 and 10, such as 0.8,1.25"
        ) from None
    return check_size_pool(factors, f"--size-pool {spec}")


#: ``--precision auto`` on the CPU runs int8 where it can (:func:`_int8_models`).
AUTO_INT8 = True


def _int8_models(
    precision: str, device: torch.device, net: LoadedNet, refiner: LoadedNet | None
) -> tuple[str, Int8Net | None, Int8Net | None]:
    """The precision a learned describer runs in and, for int8, the int8 models of its net
    and refiner (``<weights>.int8.onnx``, made from these very weights).

    ``auto`` on the CPU is int8 where that is measured faster and as accurate (README,
    "Precision"): a CPU with int8 dot-product instructions, ONNX Runtime installed and int8
    models of both weights files; otherwise (or if a model belongs to other weights: a
    warning) what :func:`resolve_precision` says."""
    resolved = resolve_precision(precision, device)
    nets = [net] + ([refiner] if refiner is not None else [])
    auto = (
        AUTO_INT8
        and precision == "auto"
        and device.type == "cpu"
        and cpu_has_int8_dot()
        and onnxruntime_available()
        and all(int8_path(n.path).is_file() for n in nets)
    )
    if resolved != "int8" and not auto:
        return resolved, None, None
    try:
        models = [Int8Net(int8_path(n.path), n.net.patch_size, n.sha256) for n in nets]
    except WeightsError as e:
        if not auto:
            raise
        log.warning("--precision auto: %s; running %s instead", e, resolved)
        return resolved, None, None
    return "int8", models[0], (models[1] if refiner is not None else None)


def _student_refiner(loaded: LoadedNet) -> str | None:
    """The refiner a student's meta names: None for "none", else the file beside its
    weights, checked against the sha256 the student was trained with."""
    name = str(loaded.meta["frames"])
    if name == "none":
        return None
    path = loaded.path.parent / name
    if not path.is_file():
        raise WeightsError(
            f"{loaded.path}: its frame refiner {name} is not beside it; copy it there or "
            "give --frames"
        )
    if sha256(path) != loaded.meta.get("frames_sha256"):
        raise WeightsError(
            f"{path}: not the frame refiner {loaded.path.name} was trained with (sha256 differs)"
        )
    return str(path)


def build_describer(
    method: str,
    weights: str | None = None,
    device: torch.device | None = None,
    batch_size: int | None = None,
    mr_size: float | None = None,
    precision: str = DEFAULT_PRECISION,
    frames: str | None = FRAMES_AUTO,
    upright: bool = False,
    size_pool: str | None = SIZE_POOL_AUTO,
) -> Describer:
    """A describer by method name. Learned nets refine the detector's frames with the
    ``frames`` net first (:func:`resolve_frames`) and pool their descriptors over the sizes
    of ``size_pool`` (:func:`resolve_size_pool`); SIFT and RootSIFT keep SIFT's frames. A
    distilled student's ``frames`` ``auto`` is the refiner it was trained with (none, or its
    own beside its weights). ``upright`` (keypoints of an upright detector): the refiner
    rescales but never turns."""
    method = resolve_method(method)
    if method in CLASSICAL:
        if weights is not None:
            raise ConfigError(f"--weights does not apply to --method {method}")
        if frames not in (None, "none", FRAMES_AUTO):
            raise ConfigError(f"--frames does not apply to --method {method}")
        if size_pool not in (None, "none", SIZE_POOL_AUTO):
            raise ConfigError(f"--size-pool does not apply to --method {method}")
        return SiftDescriber(root=method == "rootsift")
    loaded = load_net(method, weights)
    # A distilled student names the refiner it was trained with: "none" (the detector's
    # frame alone) or its own refiner's file beside its weights.
    if frames == FRAMES_AUTO and "frames" in loaded.meta and method == "student":
        frames = _student_refiner(loaded)
    if loaded.meta.get("size_pool") == [1.0] and size_pool == SIZE_POOL_AUTO:
        size_pool = None
    pool = resolve_size_pool(size_pool)
    if mr_size is None:
        mr_size = float(loaded.meta.get("mr_size", DEFAULT_MR_SIZE))
    meta: dict[str, Any] = {"weights": loaded.path.name, "weights_sha256": loaded.sha256}
    device = device or torch.device("cpu")
    frames_net: Any = None
    frames_mr, refiner = DEFAULT_MR_SIZE, None
    frames_name = resolve_frames(frames)
    if frames_name is not None:
        refiner = load_net("frames", frames_name)
        frames_net = refiner.net  # a FrameNet, by name
        frames_mr = float(refiner.meta.get("mr_size", DEFAULT_MR_SIZE))
        meta.update(frames=refiner.path.name, frames_sha256=refiner.sha256)
    precision, int8_net, int8_frames = _int8_models(precision, device, loaded, refiner)
    if int8_net is not None:
        meta["int8"] = int8_net.path.name
    if int8_frames is not None:
        meta["frames_int8"] = int8_frames.path.name
    if pool != (1.0,):
        meta["size_pool"] = list(pool)
    if batch_size is None:
        batch_size = default_batch_size(device, precision)
    return NetDescriber(
        loaded.net,
        device,
        batch_size,
        mr_size,
        meta,
        precision,
        frames_net,
        frames_mr,
        upright,
        pool,
        int8_net,
        int8_frames,
    )
