"""HardNet (Mishchuk et al., NIPS'17): the L2-Net tower with dropout, trained with the
hardest-in-batch triplet margin loss."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import DescriptorNet, L2Tower, l2_normalize, standardize


class HardNet(DescriptorNet):
    name: ClassVar[str] = "hardnet"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 128, "dropout": 0.3}

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        self.tower = L2Tower(self.conf["dim"], self.conf["dropout"])

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, inter = self.tower(standardize(x))
        return l2_normalize(out), inter
