"""A compact central-surround descriptor, trained to reproduce a larger pipeline's descriptors
from one patch per keypoint (:mod:`descmatch.train.distill`).

The input is the central-surround net's 64x64 patch over twice the keypoint window, cut in the
detector's frame. Two thin streams, each instance-normalised as SOSNet normalises its input,
see the central 32x32 crop at full resolution and the whole patch at half resolution (as
:class:`~descmatch.nets.l2net.CentralSurround` splits it); their feature maps are joined
channel-wise and one head maps them to the descriptor, so the head can mix centre and
surround the way a size-pooled teacher does.

Stream (``width`` w), ``stem`` ``conv``: conv3x3 w, conv3x3 w /2, conv3x3 2w, conv3x3 2w /2,
conv3x3 4w (each BN + ReLU) -> (4w,8,8); ``stem`` ``unshuffle``: the 32x32 input folded 2x2
into 4 channels at 16x16 (pixel unshuffle), then conv3x3 w, 2w, 2w /2, 4w: no convolution at
full resolution, where thin layers run slowest on the CPU. Head: conv8x8 (8w -> ``dim``) + BN
(no affine), L2-normalised.
About 2 x (0.15 + 0.59 + 1.18 + 0.59 + 1.18) M + 8w x 64 x dim MACs at w = 16, dim = 256:
9.5 M a patch (:func:`~descmatch.nets.cost.count_macs` counts it exactly).

Shape: forward(patches (N,1,64,64) float in [0,1]) -> (N,dim) L2-normalised.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import DescriptorNet, l2_normalize


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


#: How a stream starts (see the module docstring).
STEMS = ("conv", "unshuffle")


def _stream(w: int, stem: str) -> nn.Sequential:
    """One stream. Shape: (N,1,32,32) -> (N,4w,8,8)."""
    if stem == "unshuffle":
        return nn.Sequential(
            nn.PixelUnshuffle(2),
            *_block(4, w),
            *_block(w, 2 * w),
            *_block(2 * w, 2 * w, 2),
            *_block(2 * w, 4 * w),
        )
    return nn.Sequential(
        *_block(1, w),
        *_block(w, w, 2),
        *_block(w, 2 * w),
        *_block(2 * w, 2 * w, 2),
        *_block(2 * w, 4 * w),
    )


class StudentNet(DescriptorNet):
    """The compact central-surround student (see the module docstring)."""

    name: ClassVar[str] = "student"
    default_conf: ClassVar[dict[str, Any]] = {"width": 16, "dim": 256, "stem": "conv"}
    patch_size: ClassVar[int] = 64
    window_factor: ClassVar[float] = 2.0

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        w, dim = int(self.conf["width"]), int(self.conf["dim"])
        stem = str(self.conf["stem"])
        if w < 1 or dim < 2 or stem not in STEMS:
            raise ConfigError(
                f"student: needs width >= 1, dim >= 2 and stem one of {', '.join(STEMS)}, "
                f"got {self.conf}"
            )
        self.norm = nn.InstanceNorm2d(1, affine=False)
        self.center = _stream(w, stem)
        self.surround = _stream(w, stem)
        self.head = nn.Sequential(
            nn.Conv2d(8 * w, dim, kernel_size=8, bias=False),
            nn.BatchNorm2d(dim, affine=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shape: (N,1,64,64) -> (N,dim) unit descriptors, [centre, surround maps (N,4w,8,8)]."""
        c = self.center(self.norm(x[:, :, 16:48, 16:48]))
        s = self.surround(self.norm(F.avg_pool2d(x, kernel_size=2)))
        out = self.head(torch.cat([c, s], dim=1)).flatten(1)
        return l2_normalize(out), [c, s]
