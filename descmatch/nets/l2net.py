"""L2-Net (Tian et al., CVPR'17) and its central-surround variant L2-Net-CS."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import DescriptorNet, L2Tower, l2_normalize, standardize


class L2Net(DescriptorNet):
    """L2-Net: per-patch standardisation, the 7-layer tower, L2 normalisation."""

    name: ClassVar[str] = "l2net"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 128, "dropout": 0.0}

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        self.tower = L2Tower(self.conf["dim"], self.conf["dropout"])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, inter = self.tower(standardize(x))
        return l2_normalize(out), inter


class CentralSurround(DescriptorNet):
    """The central-surround form of a single-tower net (L2-Net's CS variant).

    The input is 64x64 and covers twice the keypoint window. One tower sees the central 32x32
    crop at full resolution (the plain net's patch), the other the whole 64x64 patch at half
    resolution; each stream is normalised as the plain net normalises its input, and the two
    L2-normalised halves are concatenated and L2-normalised again (``dim``-D).
    ``plain`` names the single-tower net whose weights can start both towers
    (:func:`descmatch.nets.init_central_surround`).
    """

    patch_size: ClassVar[int] = 64
    window_factor: ClassVar[float] = 2.0
    plain: ClassVar[str] = ""

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        half = self.conf["dim"] // 2
        self.center = L2Tower(half, self.conf["dropout"])
        self.surround = L2Tower(self.conf["dim"] - half, self.conf["dropout"])

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.forward_streams(x[:, :, 16:48, 16:48], F.avg_pool2d(x, kernel_size=2))

    def forward_streams(
        self, c: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """From the two streams' 32x32 inputs: the central window at full resolution and
        twice the window at half resolution (patches cut so by another route).
        Shape: c, s (N,1,32,32) -> (N,dim), feature maps."""
        oc, ic = self.center(self.normalize_input(c))
        os_, is_ = self.surround(self.normalize_input(s))
        out = torch.cat([l2_normalize(oc), l2_normalize(os_)], dim=1)
        return l2_normalize(out), ic + is_


class L2NetCS(CentralSurround):
    """L2-Net central-surround: per-patch standardisation of each stream (256-D)."""

    name: ClassVar[str] = "l2net-cs"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 256, "dropout": 0.0}
    plain: ClassVar[str] = "l2net"

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return standardize(x)
