"""Descriptor nets and their registry. The CLI's learned --method choices come from NETS."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import DescriptorNet, L2Tower, standardize
from .hardnet import HardNet
from .l2net import L2Net, L2NetCS
from .sosnet import SOSNet

NETS: dict[str, type[DescriptorNet]] = {
    "l2net": L2Net,
    "l2net-cs": L2NetCS,
    "hardnet": HardNet,
    "sosnet": SOSNet,
}


def build_net(name: str, conf: dict[str, Any] | None = None) -> DescriptorNet:
    """Build an (untrained) net by registry name."""
    try:
        cls = NETS[name]
    except KeyError:
        raise ConfigError(f"unknown net {name!r}; choose one of {', '.join(NETS)}") from None
    return cls(conf)


__all__ = ["NETS", "DescriptorNet", "L2Tower", "build_net", "standardize",
           "HardNet", "L2Net", "L2NetCS", "SOSNet"]
