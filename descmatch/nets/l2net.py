"""L2-Net (Tian et al., CVPR'17) and its central-surround variant L2-Net-CS."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..patches import WindowFactor
from .base import DescriptorNet, L2Tower, l2_normalize, standardize

#: What a central-surround net's training descriptors are: ``halves`` (the paper's: two unit
#: halves, norm sqrt 2) or ``unit`` (the concatenation scaled to unit length).
CONCAT_NORMS = ("halves", "unit")


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
    resolution; each stream is normalised as the plain net normalises its input, and each
    tower's output is L2-normalised.

    ``concat_norm`` says what the training losses see (``forward_features``): ``halves`` (the
    paper's) the two unit halves side by side, norm sqrt 2, distances in [0, 2 sqrt 2];
    ``unit`` the concatenation scaled to unit length (distances in [0, 2], the margins and
    temperatures of the losses then act on distances sqrt 2 smaller). Inference (``forward``,
    ``forward_streams``) always gives the unit-length concatenation, whatever ``concat_norm``:
    the two forms differ by the constant factor sqrt 2 (both halves are unit vectors), so
    nearest neighbours, mutual checks and distance ratios are the same, and descriptors keep
    the unit length that matching scores and exports assume.
    ``plain`` names the single-tower net whose weights can start both towers
    (:func:`descmatch.nets.init_central_surround`).
    """

    patch_size = 64
    window_factor: WindowFactor = 2.0
    plain: ClassVar[str] = ""

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        if self.conf["concat_norm"] not in CONCAT_NORMS:
            raise ConfigError(
                f"{self.name}: unknown concat_norm {self.conf['concat_norm']!r}; "
                f"valid: {', '.join(CONCAT_NORMS)}"
            )
        half = self.conf["dim"] // 2
        self.center = L2Tower(half, self.conf["dropout"])
        self.surround = L2Tower(self.conf["dim"] - half, self.conf["dropout"])

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _halves(self, c: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The two unit halves side by side (norm sqrt 2) and the feature maps.
        Shape: c, s (N,1,32,32) -> (N,dim), feature maps."""
        oc, ic = self.center(self.normalize_input(c))
        os_, is_ = self.surround(self.normalize_input(s))
        return torch.cat([l2_normalize(oc), l2_normalize(os_)], dim=1), ic + is_

    @staticmethod
    def _streams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :, 16:48, 16:48], F.avg_pool2d(x, kernel_size=2)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Training descriptors in the ``concat_norm`` form, and the feature maps.
        Shape: (N,1,64,64) -> (N,dim), feature maps."""
        out, maps = self._halves(*self._streams(x))
        return (out if self.conf["concat_norm"] == "halves" else l2_normalize(out)), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length descriptors. Shape: (N,1,64,64) -> (N,dim)."""
        return l2_normalize(self._halves(*self._streams(x))[0])

    def forward_streams(
        self, c: torch.Tensor, s: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """From the two streams' 32x32 inputs: the central window at full resolution and
        twice the window at half resolution (patches cut so by another route); unit-length
        descriptors as ``forward``. Shape: c, s (N,1,32,32) -> (N,dim), feature maps."""
        out, maps = self._halves(c, s)
        return l2_normalize(out), maps


class L2NetCS(CentralSurround):
    """L2-Net central-surround: per-patch standardisation of each stream (256-D)."""

    name: ClassVar[str] = "l2net-cs"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 256, "dropout": 0.0, "concat_norm": "halves"}
    plain: ClassVar[str] = "l2net"

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return standardize(x)
