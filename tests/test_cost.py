"""count_macs: multiply-adds per sample, counted by forward hooks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from descmatch.nets import build_net
from descmatch.nets.cost import count_macs


def test_counts_convolutions_and_linear_layers() -> None:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 4 x 8 x 8 outputs x 9
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),  # 8 x 4 x 4 outputs x 2 x 9
        nn.Flatten(),
        nn.Linear(128, 10),
    )
    assert count_macs(net, (1, 8, 8)) == 4 * 64 * 9 + 8 * 16 * 18 + 128 * 10


def test_a_layer_called_twice_counts_twice_and_mode_is_kept() -> None:
    conv = nn.Conv2d(2, 2, 1)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(self.conv(x))

    net = Twice().train()
    assert count_macs(net, (2, 4, 4)) == 2 * (2 * 16 * 2)
    assert net.training
    assert not conv._forward_hooks


@pytest.mark.parametrize(
    ("name", "millions"), [("sosnet", 39.09), ("sosnet-cs", 78.18), ("frames", 9.59)]
)
def test_shipped_architectures(name: str, millions: float) -> None:
    """The L2-Net tower's ~39 M multiply-adds a patch; the CS net runs two towers."""
    net = build_net(name)
    macs = count_macs(net, (1, net.patch_size, net.patch_size))
    assert macs == pytest.approx(millions * 1e6, rel=1e-3)
