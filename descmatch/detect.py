"""Keypoint detection. Keypoints carry position, size (OpenCV diameter), angle and response.

Coordinates: pixel centres at integers, the top-left pixel's centre at (0,0) (OpenCV's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import cv2
import numpy as np

from .errors import ConfigError


@dataclass
class Keypoints:
    """Keypoints of one image, strongest first.

    Shape: xy (N,2) float32; size, angle (degrees, OpenCV convention), response (N,) float32.
    ``cv`` keeps OpenCV's own KeyPoint objects when the detector made them, and ``detector``
    the detector (SIFT's descriptor needs the octave they encode and the same scale space).
    """

    xy: np.ndarray
    size: np.ndarray
    angle: np.ndarray
    response: np.ndarray
    cv: tuple[Any, ...] | None = field(default=None, repr=False)
    detector: Any = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    def select(self, idx: np.ndarray) -> Keypoints:
        cv = tuple(self.cv[i] for i in idx) if self.cv is not None else None
        return Keypoints(
            self.xy[idx], self.size[idx], self.angle[idx], self.response[idx], cv, self.detector
        )

    def scaled(self, sx: float, sy: float) -> Keypoints:
        """Map to another resolution scaled by (sx, sy): with pixel centres at integers,
        x' = (x + 0.5) * sx - 0.5."""
        xy = (self.xy + 0.5) * np.array([sx, sy], np.float32) - 0.5
        return Keypoints(
            xy.astype(np.float32),
            (self.size * np.sqrt(sx * sy)).astype(np.float32),
            self.angle,
            self.response,
            None,
        )

    @staticmethod
    def empty() -> Keypoints:
        z = np.zeros((0,), np.float32)
        return Keypoints(np.zeros((0, 2), np.float32), z, z.copy(), z.copy(), ())


@runtime_checkable
class Detector(Protocol):
    """What ``extract``, ``match_images`` and ``sfm`` need of a keypoint detector.

    ``name`` is recorded in features files; ``settings()`` is what a features file records
    and must match to be completed; calling it on a gray float32 image in [0,1] gives its
    keypoints, strongest first. Shape: image (H,W) -> Keypoints of N points.
    """

    name: ClassVar[str]

    @property
    def max_keypoints(self) -> int: ...

    @property
    def upright(self) -> bool: ...

    def settings(self) -> dict[str, Any]: ...

    def __call__(self, image: np.ndarray) -> Keypoints: ...


@dataclass(frozen=True)
class DoGSettings:
    """The settings of a DoG/SIFT detector, shared by OpenCV's and the torch one.

    ``contrast_threshold`` is lower than OpenCV's 0.04 so that low-texture images still get
    keypoints; the budget ``max_keypoints`` then keeps the strongest responses.
    """

    max_keypoints: int = 4000
    contrast_threshold: float = 0.01
    edge_threshold: float = 10.0
    sigma: float = 1.6
    n_octave_layers: int = 3
    upright: bool = False

    name: ClassVar[str] = "dog"

    def settings(self) -> dict[str, Any]:
        """What a features file records (and must match to be completed)."""
        return {
            "detector": self.name,
            "max_keypoints": self.max_keypoints,
            "contrast_threshold": self.contrast_threshold,
            "edge_threshold": self.edge_threshold,
            "sigma": self.sigma,
            "n_octave_layers": self.n_octave_layers,
            "upright": self.upright,
        }


@dataclass(frozen=True)
class SiftDetector(DoGSettings):
    """OpenCV's DoG detector with SIFT orientation assignment."""

    name: ClassVar[str] = "sift"

    def make_cv(self) -> Any:
        # precise upscale: without it OpenCV's keypoints sit 0.25 px down-right.
        return cv2.SIFT.create(
            nfeatures=0,
            nOctaveLayers=self.n_octave_layers,
            contrastThreshold=self.contrast_threshold,
            edgeThreshold=self.edge_threshold,
            sigma=self.sigma,
            enable_precise_upscale=True,
        )

    def __call__(self, image: np.ndarray) -> Keypoints:
        """Detect on a gray float32 image in [0,1]. Shape: image (H,W)."""
        if min(image.shape[:2]) < 16:
            return Keypoints.empty()
        img8 = to_uint8(image)
        kps = self.make_cv().detect(img8, None)
        if not kps:
            return Keypoints.empty()
        # OpenCV hands back KeyPoint objects: one pass reads their fields into arrays.
        arr = np.array([(k.pt[0], k.pt[1], k.size, k.angle, k.response) for k in kps], np.float32)
        order = np.argsort(-arr[:, 4], kind="stable")
        if self.upright:
            arr[:, 3] = 0.0
            # Several orientations of one DoG extremum become the same keypoint: keep one.
            key = np.round(arr[order][:, :3] * 100).astype(np.int64)
            _, first = np.unique(key, axis=0, return_index=True)
            order = order[np.sort(first)]
        order = order[: self.max_keypoints] if self.max_keypoints > 0 else order
        cv = tuple(kps[i] for i in order)
        if self.upright:
            for k in cv:
                k.angle = 0.0
        a = arr[order]
        return Keypoints(
            np.ascontiguousarray(a[:, :2]), a[:, 2].copy(), a[:, 3].copy(), a[:, 4].copy(), cv, self
        )


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _dog(**conf: Any) -> Detector:
    from .dog import DoGDetector  # torch: imported when asked for

    return DoGDetector(**conf)


#: sift: OpenCV's detector (CPU); dog: the same DoG detector in torch (any device, the GPU path)
DETECTORS: dict[str, Callable[..., Detector]] = {"sift": SiftDetector, "dog": _dog}


def build_detector(name: str = "sift", **conf: Any) -> Detector:
    """A detector by name (:data:`DETECTORS`): ``build_detector("sift", max_keypoints=8000)``."""
    try:
        make = DETECTORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}"
        ) from None
    return make(**conf)
