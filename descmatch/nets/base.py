"""Shared pieces of the descriptor nets: the configurable base class and the L2-Net tower."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..patches import WindowFactor
from .fold import fold_batchnorm


def merged_conf(name: str, defaults: dict[str, Any], conf: dict[str, Any] | None) -> dict[str, Any]:
    """A net's configuration: its defaults updated by ``conf``; unknown keys are an error
    that lists the valid ones."""
    conf = dict(conf or {})
    unknown = sorted(set(conf) - set(defaults))
    if unknown:
        raise ConfigError(
            f"{name}: unknown config key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(defaults))}"
        )
    return {**defaults, **conf}


class DescriptorNet(nn.Module):
    """Base class of every learned descriptor.

    A subclass declares ``default_conf``; unknown keys are an error that lists the valid ones.
    ``patch_size`` is the side of the input patch in net pixels and ``window_factor`` how many
    keypoint windows (``mr_size x size``) the input spans (1 for plain nets, 2 for the
    central-surround variant, whose input shows the surround too); a tuple of factors makes a
    multi-view net, whose input is one ``patch_size`` patch per factor, stacked as channels (a
    net whose configuration chooses its input sets both in ``__init__``).

    Shape: forward(patches (N,C,P,P) float in [0,1], C = :meth:`input_shape`'s) -> (N,D)
    L2-normalised float.
    """

    name: ClassVar[str] = ""
    default_conf: ClassVar[dict[str, Any]] = {}
    patch_size: int = 32
    window_factor: WindowFactor = 1.0

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.conf: dict[str, Any] = merged_conf(self.name, self.default_conf, conf)

    @property
    def dim(self) -> int:
        return int(self.conf["dim"])

    def input_shape(self) -> tuple[int, int, int]:
        """One keypoint's input: (views, P, P)."""
        views = len(self.window_factor) if isinstance(self.window_factor, tuple) else 1
        return (views, self.patch_size, self.patch_size)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Descriptors and the intermediate feature maps used by L2-Net's E3 loss."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def inference_form(self) -> DescriptorNet:
        """A copy in eval mode that computes the same descriptors with fewer passes over the
        feature maps: batch norm folded into the convolutions (:func:`fold_batchnorm`); a net
        may fuse more."""
        folded = fold_batchnorm(self.eval())
        assert isinstance(folded, DescriptorNet)
        return folded


def standardize(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-patch zero mean, unit standard deviation. Shape: (N,C,H,W) -> (N,C,H,W)."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).view(-1, 1, 1, 1)
    return (x - mean) / (std + eps)


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout, affine=False),
        nn.ReLU(inplace=True),
    ]


class L2Tower(nn.Module):
    """The 7-layer L2-Net tower used by L2-Net, HardNet and SOSNet (about 39 M MACs/patch).

    conv3x3 32, 32, 64/2, 64, 128/2, 128 (each BN + ReLU), dropout, conv8x8 -> dim, BN.
    Shape: (N,1,32,32) normalised input -> (N,dim) (not L2-normalised), plus the feature maps
    after the first block (N,32,32,32) and after the sixth (N,128,8,8).
    """

    def __init__(self, dim: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        self.first = nn.Sequential(*_block(1, 32))
        self.middle = nn.Sequential(
            *_block(32, 32),
            *_block(32, 64, 2),
            *_block(64, 64),
            *_block(64, 128, 2),
            *_block(128, 128),
        )
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Conv2d(128, dim, kernel_size=8, bias=False),
            nn.BatchNorm2d(dim, affine=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.orthogonal_(m.weight, gain=0.6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f1 = self.first(x)
        f6 = self.middle(f1)
        out = self.head(f6).flatten(1)
        return out, [f1, f6]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2.0, dim=1, eps=1e-10)
