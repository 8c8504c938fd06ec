"""SOSNet (Tian et al., CVPR'19): the L2-Net tower behind an instance-norm input layer,
trained with a first-order hinge plus the second-order similarity regulariser; and its
central-surround form SOSNet-CS (L2-Net's CS construction, trained with SOSNet's loss)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import DescriptorNet, L2Tower, l2_normalize
from .l2net import CentralSurround


class SOSNet(DescriptorNet):
    name: ClassVar[str] = "sosnet"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 128, "dropout": 0.1}

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        self.norm = nn.InstanceNorm2d(1, affine=False)
        self.tower = L2Tower(self.conf["dim"], self.conf["dropout"])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, inter = self.tower(self.norm(x))
        return l2_normalize(out), inter


class SOSNetCS(CentralSurround):
    """SOSNet central-surround: each stream instance-normalised as SOSNet's input (256-D)."""

    name: ClassVar[str] = "sosnet-cs"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 256, "dropout": 0.1, "concat_norm": "halves"}
    plain: ClassVar[str] = "sosnet"

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        self.norm = nn.InstanceNorm2d(1, affine=False)

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)
