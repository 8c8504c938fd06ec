"""A learned keypoint frame refiner: a small net that looks at a keypoint's patch, cut in the
detector's frame, and turns and rescales that frame.

The DoG detector's orientation (the peak of a gradient histogram) and scale (the DoG extremum)
move under viewpoint change, and a patch descriptor sees a pair cut in disagreeing frames as
rotated or rescaled. The net predicts a log scale factor ``rho`` (at most ``log(max_scale)``
either way) and, when built with ``rotation``, a rotation ``theta`` (radians, at most
``max_rotation`` degrees either way; else 0); the refined frame is angle ``a + theta`` and
size ``s * exp(rho)``. (Measured on v_churchill with sosnet-cs, the learned rotation did not
help and the scale did: the shipped refiner is scale-only.)

It is trained covariantly (:mod:`descmatch.train.frames`): for the two keypoints of a matching
pair with known local geometry, the refined frames must map onto each other, so the
refinement moves both towards one frame fixed by the image content, whatever the detector
chose. The output is bounded so that keypoints the detector gives several
orientations at one place stay distinct.

Shape: forward(patches (N,1,32,32) float in [0,1]) -> (theta (N,), rho (N,)).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..patches import DEFAULT_MR_SIZE, extract_patches
from .base import merged_conf, standardize


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class FrameNet(nn.Module):
    """conv3x3 w, w, 2w/2, 2w, 4w/2, 4w (BN + ReLU), conv8x8 -> 1 (log scale) or 2 (and
    rotation); about 10 M MACs a patch at w = 16. The head starts at zero: an untrained net
    keeps the detector's frames."""

    name: ClassVar[str] = "frames"
    default_conf: ClassVar[dict[str, Any]] = {
        "width": 16,
        "rotation": False,
        "max_rotation": 60.0,
        "max_scale": 1.8,
    }
    patch_size: ClassVar[int] = 32

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.conf: dict[str, Any] = merged_conf(self.name, self.default_conf, conf)
        w = int(self.conf["width"])
        if not (
            0 < float(self.conf["max_rotation"]) <= 180
            and float(self.conf["max_scale"]) > 1
            and w > 0
        ):
            raise ConfigError(
                "frames: needs width > 0, 0 < max_rotation <= 180 and "
                f"max_scale > 1, got {self.conf}"
            )
        self.body = nn.Sequential(
            *_block(1, w),
            *_block(w, w),
            *_block(w, 2 * w, 2),
            *_block(2 * w, 2 * w),
            *_block(2 * w, 4 * w, 2),
            *_block(4 * w, 4 * w),
        )
        self.rotation = bool(self.conf["rotation"])
        self.head = nn.Conv2d(4 * w, 2 if self.rotation else 1, kernel_size=8)
        nn.init.zeros_(self.head.weight)
        assert self.head.bias is not None  # Conv2d's default bias=True
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.head(self.body(standardize(x, eps=1e-6))).flatten(1).float()
        max_log = math.log(float(self.conf["max_scale"]))
        rho = max_log * torch.tanh(z[:, -1])
        if not self.rotation:
            return torch.zeros_like(rho), rho
        return math.radians(float(self.conf["max_rotation"])) * torch.tanh(z[:, 0]), rho


@torch.inference_mode()
def refine_frames(
    net: FrameNet,
    image: torch.Tensor,
    xy: np.ndarray,
    size: np.ndarray,
    angle: np.ndarray,
    mr_size: float = DEFAULT_MR_SIZE,
    pyramid: list[torch.Tensor] | None = None,
    batch_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The refined sizes and angles (degrees, in [0, 360)) of keypoints: one pass of ``net``
    on their patches cut in the given frames (window ``mr_size x size``), in batches of
    ``batch_size`` (default: 256 on the CPU, 4x faster there than 2048, else 2048).

    Shape: image (H,W) on the net's device; xy (N,2), size, angle (N,) -> size, angle (N,)
    float32.
    """
    size = np.asarray(size, np.float32)
    angle = np.asarray(angle, np.float32)
    if len(size) == 0:
        return size.copy(), angle.copy()
    patches = extract_patches(
        image, xy, size, angle, patch_size=net.patch_size, mr_size=mr_size, pyramid=pyramid
    )
    if batch_size is None:
        batch_size = 256 if image.device.type == "cpu" else 2048
    thetas, rhos = [], []
    for i in range(0, len(patches), batch_size):
        theta, rho = net(patches[i : i + batch_size])
        thetas.append(theta)
        rhos.append(rho)
    theta = torch.cat(thetas).cpu().numpy().astype(np.float64)
    rho = torch.cat(rhos).cpu().numpy().astype(np.float64)
    new_angle = (angle + np.rad2deg(theta)) % 360.0
    new_size = size * np.exp(rho)
    return new_size.astype(np.float32), new_angle.astype(np.float32)


def refined_keypoints(
    net: FrameNet,
    image: np.ndarray,
    kps: Any,
    device: torch.device,
    mr_size: float = DEFAULT_MR_SIZE,
    batch_size: int | None = None,
) -> Any:
    """:class:`~descmatch.detect.Keypoints` with the net's frames (same order and positions;
    OpenCV's own keypoints dropped, as they hold the old frames)."""
    img = torch.from_numpy(np.ascontiguousarray(image, np.float32)).to(device)
    size, angle = refine_frames(
        net, img, kps.xy, kps.size, kps.angle, mr_size, batch_size=batch_size
    )
    return replace(kps, size=size, angle=angle, cv=None)
