"""A compact multi-stream descriptor, trained to reproduce a larger pipeline's descriptors
(:mod:`descmatch.train.distill`).

Thin streams, each instance-normalised as SOSNet normalises its input, see the keypoint at
several window sizes, 32x32 each; their feature maps are joined channel-wise and one head
maps them to the descriptor, so the head can mix the views the way a size-pooled teacher
does. ``views`` chooses the input:

* 2 (the default): the central-surround net's 64x64 patch over twice the keypoint window;
  one stream sees its central 32x32 at full resolution, the other the whole patch at half
  resolution (as :class:`~descmatch.nets.l2net.CentralSurround` splits it).
* 3: three 32x32 patches over 1, 2 and 4 keypoint windows (``window_factor`` (1, 2, 4)),
  each cut from the pyramid level that suits it; at ``mr_size`` 7 they span 0.7, 1.4 and
  2.8 times the default's 10-unit window, the views that a teacher size-pooling at 0.7x and
  1.4x with its surround tower sees.

Stream (``width`` w), ``stem`` ``conv``: conv3x3 w, conv3x3 w /2, conv3x3 2w, conv3x3 2w /2,
conv3x3 4w (each BN + ReLU) -> (4w,8,8); ``stem`` ``unshuffle``: the 32x32 input folded 2x2
into 4 channels at 16x16 (pixel unshuffle), then conv3x3 w, 2w, 2w /2, 4w: no convolution at
full resolution, where thin layers run slowest on the CPU. Head: conv8x8 (4w x views ->
``dim``) + BN (no affine), L2-normalised.
About 2 x (0.15 + 0.59 + 1.18 + 0.59 + 1.18) M + 8w x 64 x dim MACs at w = 16, dim = 256,
2 views: 9.5 M a patch (:func:`~descmatch.nets.cost.count_macs` counts it exactly).

For inference (:meth:`StudentNet.inference_form`) the streams run as one: each layer's
convolutions become one grouped convolution (a group per stream) over the views stacked as
channels, the same function with fewer calls and no join before the head.

Shape: forward(patches (N,1,64,64) (2 views) or (N,3,32,32) float in [0,1]) -> (N,dim)
L2-normalised.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..patches import WindowFactor
from .base import DescriptorNet, l2_normalize

_NORM_EPS = 1e-5  # SOSNet's input normalisation (InstanceNorm2d's default)


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


def _grouped(layers: tuple[nn.Module, ...]) -> nn.Module:
    """The same layer of each stream as one layer over all streams' channels, in stream order."""
    n = len(layers)
    if all(isinstance(m, nn.Conv2d) for m in layers):
        convs = [m for m in layers if isinstance(m, nn.Conv2d)]
        c0 = convs[0]
        conv = nn.Conv2d(
            n * c0.in_channels,
            n * c0.out_channels,
            c0.kernel_size,  # type: ignore[arg-type]
            stride=c0.stride,  # type: ignore[arg-type]
            padding=c0.padding,  # type: ignore[arg-type]
            groups=n * c0.groups,
            bias=c0.bias is not None,
        )
        conv.weight.data = torch.cat([m.weight.data for m in convs])
        if conv.bias is not None:
            conv.bias.data = torch.cat([m.bias.data for m in convs if m.bias is not None])
        return conv.to(c0.weight.device, c0.weight.dtype)
    if all(isinstance(m, nn.BatchNorm2d) for m in layers):
        bns = [m for m in layers if isinstance(m, nn.BatchNorm2d)]
        bn = nn.BatchNorm2d(n * bns[0].num_features, bns[0].eps, affine=bns[0].affine).eval()
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bns[0], name) is not None:
                getattr(bn, name).data = torch.cat([getattr(m, name).data for m in bns])
        return bn
    first = layers[0]
    if all(type(m) is type(first) for m in layers) and not any(True for _ in first.parameters()):
        return first  # ReLU, Identity, PixelUnshuffle: channel-wise alike
    raise TypeError(f"student: cannot group stream layers {layers}")


#: The inputs a student can see (``views``): 2, the central-surround 64-px patch; 3, three
#: 32-px patches over 1, 2 and 4 keypoint windows.
VIEWS = (2, 3)


class StudentNet(DescriptorNet):
    """The compact student (see the module docstring)."""

    name: ClassVar[str] = "student"
    default_conf: ClassVar[dict[str, Any]] = {"width": 16, "dim": 256, "stem": "conv", "views": 2}
    patch_size = 64
    window_factor: WindowFactor = 2.0

    def __init__(self, conf: dict[str, Any] | None = None) -> None:
        super().__init__(conf)
        w, dim = int(self.conf["width"]), int(self.conf["dim"])
        stem, views = str(self.conf["stem"]), self.conf["views"]
        if w < 1 or dim < 2 or stem not in STEMS or views not in VIEWS:
            raise ConfigError(
                f"student: needs width >= 1, dim >= 2, stem one of {', '.join(STEMS)} and "
                f"views one of {', '.join(map(str, VIEWS))}, got {self.conf}"
            )
        self.views = int(views)
        if self.views == 3:
            self.patch_size, self.window_factor = 32, (1.0, 2.0, 4.0)
            self.fine = _stream(w, stem)
        self.center = _stream(w, stem)
        self.surround = _stream(w, stem)
        self.head = nn.Sequential(
            nn.Conv2d(4 * w * self.views, dim, kernel_size=8, bias=False),
            nn.BatchNorm2d(dim, affine=False),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.streams: nn.Sequential | None = None  # all streams as one (inference form)

    def _stream_list(self) -> list[nn.Module]:
        """The streams in input-channel order: [fine,] centre, surround."""
        first = [self.fine] if self.views == 3 else []
        return [*first, self.center, self.surround]

    def _view_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Each stream's input, instance-normalised, as channels.
        Shape: (N,1,64,64) (2 views) or (N,3,32,32) -> (N,views,32,32)."""
        if self.views == 2:
            x = torch.cat([x[:, :, 16:48, 16:48], F.avg_pool2d(x, kernel_size=2)], dim=1)
        return F.instance_norm(x, eps=_NORM_EPS)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Shape: (N,1,64,64) or (N,3,32,32) -> (N,dim) unit descriptors, each stream's maps
        (N,4w,8,8)."""
        z = self._view_inputs(x)
        if self.streams is not None:
            maps = self.streams(z)
            parts = list(maps.chunk(self.views, dim=1))
        else:
            parts = [s(z[:, i : i + 1]) for i, s in enumerate(self._stream_list())]
            maps = torch.cat(parts, dim=1)
        out = self.head(maps).flatten(1)
        return l2_normalize(out), parts

    def inference_form(self) -> StudentNet:
        """The folded copy with all streams as one grouped stream (module docstring): the
        same descriptors, the net 3-8% faster on the CPU in bf16."""
        net = super().inference_form()
        assert isinstance(net, StudentNet)
        if net.streams is None:
            layers = zip(*net._stream_list(), strict=True)
            net.streams = nn.Sequential(*(_grouped(group) for group in layers))
            del net.center, net.surround
            if net.views == 3:
                del net.fine
        return net
