"""Descriptor nets and their registry. The CLI's learned --method choices come from NETS."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import DescriptorNet, L2Tower, standardize
from .frames import FrameNet
from .hardnet import HardNet
from .l2net import CentralSurround, L2Net, L2NetCS
from .sosnet import SOSNet, SOSNetCS
from .student import StudentNet

NETS: dict[str, type[DescriptorNet]] = {
    "l2net": L2Net,
    "l2net-cs": L2NetCS,
    "hardnet": HardNet,
    "sosnet": SOSNet,
    "sosnet-cs": SOSNetCS,
    "student": StudentNet,
}

#: Every net a weights file can hold: the descriptors and the keypoint frame refiner.
MODELS: dict[str, type[Any]] = {**NETS, "frames": FrameNet}


def build_net(name: str, conf: dict[str, Any] | None = None) -> Any:
    """Build an (untrained) net by registry name (a descriptor net, or ``frames``)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown net {name!r}; choose one of {', '.join(MODELS)}") from None
    return cls(conf)


def init_central_surround(net: CentralSurround, plain: DescriptorNet) -> None:
    """Start both towers of a central-surround net from a trained plain net's tower.

    The centre stream then computes exactly the plain net's descriptor and the surround
    stream the plain net's descriptor of the doubled window, so training starts from their
    concatenation. Both must have the tower's width (``dim`` of the CS net = 2 x the plain's).
    """
    if plain.name != net.plain:
        raise ConfigError(f"{net.name} starts from {net.plain} weights, not {plain.name}")
    tower = getattr(plain, "tower", None)
    if tower is None or net.dim != 2 * plain.dim:
        raise ConfigError(
            f"{net.name} ({net.dim}-D) cannot start from a {plain.dim}-D {plain.name}"
        )
    state = tower.state_dict()
    net.center.load_state_dict(state)
    net.surround.load_state_dict(state)


__all__ = [
    "MODELS",
    "NETS",
    "FrameNet",
    "CentralSurround",
    "DescriptorNet",
    "L2Tower",
    "build_net",
    "init_central_surround",
    "standardize",
    "HardNet",
    "L2Net",
    "L2NetCS",
    "SOSNet",
    "SOSNetCS",
    "StudentNet",
]
