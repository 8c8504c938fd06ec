"""The learned nets' describer: patches cut in one batched call per image, the net (batch norm
folded) in chunks on the device, in fp32, bf16/fp16 (autocast) or int8, optionally after a
frame refiner and with size pooling (:func:`~descmatch.describe.build_describer` builds it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from .detect import Keypoints
from .errors import ConfigError
from .nets import DescriptorNet, FrameNet
from .nets.fold import fold_batchnorm
from .nets.frames import refined_keypoints
from .patches import DEFAULT_MR_SIZE, build_pyramid, extract_patches

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
        self.net: DescriptorNet = net.inference_form().to(device)
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


def check_size_pool(factors: tuple[float, ...], what: str) -> tuple[float, ...]:
    """Size-pooling factors as floats; at least one, each between 0 and 10 (else a
    ConfigError naming ``what``)."""
    if not factors or any(not 0 < f < 10 for f in factors):
        raise ConfigError(
            f"{what}: expected size factors between 0 and 10, such as 0.8,1.25; "
            f"got {','.join(map(str, factors)) or 'none'}"
        )
    return tuple(float(f) for f in factors)
