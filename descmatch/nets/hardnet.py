"""HardNet (Mishchuk et al., NIPS'17): the L2-Net architecture with dropout before the last
convolution, trained with the hardest-in-batch triplet margin loss."""

from __future__ import annotations

from typing import Any, ClassVar

from .l2net import L2Net


class HardNet(L2Net):
    name: ClassVar[str] = "hardnet"
    default_conf: ClassVar[dict[str, Any]] = {"dim": 128, "dropout": 0.3}
