"""Describers: turn an image and its keypoints into descriptors.

Classical SIFT and RootSIFT (OpenCV's descriptor on the same keypoints) and the learned nets
(patches cut in one batched call, the net run in chunks on the device) share one interface,
so every method goes through the same pipeline and files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import torch

from .detect import Keypoints, SiftDetector, to_uint8
from .errors import ConfigError, WeightsError
from .int8 import Int8Net, cpu_has_int8_dot, int8_path, onnxruntime_available
from .nets import NETS, DescriptorNet, FrameNet
from .nets.fold import fold_batchnorm
from .nets.frames import refined_keypoints
from .patches import DEFAULT_MR_SIZE, build_pyramid, extract_patches
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


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
DEFAULT_PRECISION = "auto"


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: fp16 on CUDA, bf16 on CPUs with native bf16, else fp32. ``int8`` (the nets'
    shipped int8 models through ONNX Runtime, :mod:`descmatch.int8`) runs on the CPU only."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ConfigError("--precision fp16 needs a CUDA device; use bf16 on the CPU")
        if precision == "int8" and device.type != "cpu":
            raise ConfigError(f"--precision int8 runs on the CPU, not {device.type}")
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class NetDescriber:
    """A learned net on patches: one pyramid and one sampling call per image, the net (batch
    norm folded in) in chunks of ``batch_size`` under inference mode on ``device``, in
    ``precision`` (fp32 is the reference; bf16/fp16 run under autocast; int8 runs
    ``int8_net``, the net's int8 model, :class:`~descmatch.int8.Int8Net`, and ``int8_frames``
    the refiner's).

    With a ``frames`` net, calling the describer first refines the keypoints' frames
    (:meth:`refine`: in ``precision``, int8 with ``int8_frames``; with ``upright``, sizes only)
    and describes the patches cut in the refined frames;
    :meth:`describe` and :meth:`describe_many` take the frames as given.

    ``size_pool`` (factors of the keypoint size, e.g. (0.8, 1.25)): domain-size pooling, as in
    DSP-SIFT (Dong and Soatto, CVPR'15): the descriptor is the normalised sum of the net's
    descriptors of patches cut at each of these sizes, which evens out the detector's scale
    errors at len(size_pool) times the net's cost; (1.0,) describes the one patch."""

    def __init__(
        self,
        net: DescriptorNet,
        device: torch.device,
        batch_size: int = 1024,
        mr_size: float = DEFAULT_MR_SIZE,
        meta: dict[str, Any] | None = None,
        precision: str = "fp32",
        frames: FrameNet | None = None,
        frames_mr_size: float = DEFAULT_MR_SIZE,
        upright: bool = False,
        size_pool: tuple[float, ...] = (1.0,),
        int8_net: Callable[[torch.Tensor], torch.Tensor] | None = None,
        int8_frames: Any = None,
    ) -> None:
        self.size_pool = check_size_pool(size_pool, "size pooling")
        self.frames: FrameNet | None = (
            fold_batchnorm(frames.eval()).to(device)  # type: ignore[assignment]
            if frames is not None
            else None
        )
        self.frames_mr_size = frames_mr_size
        self.upright = upright
        self.net: DescriptorNet = fold_batchnorm(net.eval()).to(device)  # type: ignore[assignment]
        self.device = device
        self.batch_size = batch_size
        self.mr_size = mr_size
        self.name = net.name
        self.dim = net.dim
        self.meta = meta or {}
        self.precision = resolve_precision(precision, device)
        if self.precision == "int8" and int8_net is None:
            raise ConfigError(f"--precision int8: no int8 model given for {net.name}")
        if self.precision == "int8" and frames is not None and int8_frames is None:
            raise ConfigError("--precision int8: no int8 model given for the frame refiner")
        self.int8_net = int8_net if self.precision == "int8" else None
        self.int8_frames = int8_frames if self.precision == "int8" else None
        if device.type == "cpu" and self.precision != "int8":
            # Thin convolutions run faster channels-last on the CPU, in fp32 and in bf16
            # (benchmarks/extract_cost.py); a (N,1,P,P) patch batch is already laid out so.
            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if self.frames is not None:
                self.frames = self.frames.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @torch.inference_mode()
    def patches(self, image: np.ndarray, kps: Keypoints) -> torch.Tensor:
        """The patches of every keypoint at each ``size_pool`` factor, factor-major.
        Shape: -> (len(size_pool) * N,1,P,P)."""
        img = torch.from_numpy(image).to(self.device)
        pyramid = build_pyramid(img)
        return torch.cat(
            [
                extract_patches(
                    img,
                    kps.xy,
                    kps.size * f,
                    kps.angle,
                    patch_size=self.net.patch_size,
                    mr_size=self.mr_size,
                    window_factor=self.net.window_factor,
                    pyramid=pyramid,
                )
                for f in self.size_pool
            ]
        )

    def _pool(self, desc: torch.Tensor) -> torch.Tensor:
        """Descriptors of :meth:`patches` (factor-major) -> one per keypoint: the normalised
        sum over the factors. Shape: (F*N,D) -> (N,D)."""
        f = len(self.size_pool)
        if f == 1:
            return desc
        return torch.nn.functional.normalize(
            desc.reshape(f, desc.shape[0] // f, desc.shape[1]).sum(0), dim=1
        )

    @torch.inference_mode()
    def describe_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Shape: (N,1,P,P) -> (N,D) float32."""
        if self.int8_net is not None:
            run = self.int8_net
            out = [
                run(patches[i : i + self.batch_size]).to(self.device)
                for i in range(0, patches.shape[0], self.batch_size)
            ]
            if not out:
                return torch.zeros((0, self.dim), device=self.device)
            return torch.nn.functional.normalize(torch.cat(out), dim=1)
        if self.device.type == "cpu":
            patches = patches.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = [
                self.net(patches[i : i + self.batch_size]).float()
                for i in range(0, patches.shape[0], self.batch_size)
            ]
        if not out:
            return torch.zeros((0, self.dim), device=self.device)
        # Reduced precision rounds the net's own L2 normalisation: redo it in float32.
        return torch.nn.functional.normalize(torch.cat(out).float(), dim=1)

    def _autocast(self) -> torch.autocast:
        """The nets' reduced precision (bf16, fp16), or fp32 as they are."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(
            self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        )

    def refine(self, image: np.ndarray, kps: Keypoints) -> Keypoints:
        """The keypoints in the frames net's frames (as they are without one), in the
        describer's precision."""
        if self.frames is None or len(kps) == 0:
            return kps
        with self._autocast():
            out = refined_keypoints(
                self.int8_frames or self.frames,  # an Int8Net answers the FrameNet's call
                image,
                kps,
                self.device,
                self.frames_mr_size,
                self.batch_size,
            )
        return replace(out, angle=kps.angle) if self.upright else out

    def describe(self, image: np.ndarray, kps: Keypoints) -> np.ndarray:
        """Descriptors of patches cut in the keypoints' frames as given."""
        if len(kps) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._pool(self.describe_patches(self.patches(image, kps))).cpu().numpy()

    def __call__(self, image: np.ndarray, kps: Keypoints) -> np.ndarray:
        return self.describe(image, self.refine(image, kps))

    @property
    def pack_patches(self) -> int:
        """How many patches :func:`~descmatch.extract.extract` gathers across images before
        calling the net: on CUDA a full batch, so images with few keypoints still fill the
        device (a batch of patches: each keypoint has one per size-pooling factor); on the
        CPU 0 (per image: batches of 256 fill the cores already)."""
        if self.device.type != "cuda":
            return 0
        return max(1, self.batch_size // len(self.size_pool))

    def describe_many(self, items: list[tuple[np.ndarray, Keypoints]]) -> list[np.ndarray]:
        """Several images in one pass of the net: their patches cut per image (in the frames
        as given), described together in batches of ``batch_size``, split back.
        Shape: -> [(N_i,D) float32]."""
        counts = [len(k) for _, k in items]
        cut = [self.patches(img, k) for img, k in items if len(k)]
        if not cut:
            return [np.zeros((0, self.dim), np.float32) for _ in items]
        desc = self.describe_patches(torch.cat(cut))
        parts = torch.split(desc, [len(self.size_pool) * c for c in counts])
        return [self._pool(p).cpu().numpy() for p in parts]


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


def check_size_pool(factors: tuple[float, ...], what: str) -> tuple[float, ...]:
    """Size-pooling factors as floats; at least one, each between 0 and 10 (else a
    ConfigError naming ``what``)."""
    if not factors or any(not 0 < f < 10 for f in factors):
        raise ConfigError(
            f"{what}: expected size factors between 0 and 10, such as 0.8,1.25; "
            f"got {','.join(map(str, factors)) or 'none'}"
        )
    return tuple(float(f) for f in factors)


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
    of ``size_pool`` (:func:`resolve_size_pool`); SIFT and RootSIFT keep SIFT's frames.
    ``upright`` (keypoints of an upright detector): the refiner rescales but never turns."""
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
