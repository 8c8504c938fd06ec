"""Inference form of a trained net: batch norm folded into the convolutions before it.

The folded copy computes the same function as the net in eval mode (up to rounding) with
one fewer pass over every feature map per layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    assert bn.running_var is not None and bn.running_mean is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale = scale * bn.weight
        shift = shift * bn.weight + bn.bias
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )  # type: ignore[arg-type]
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        fused.bias.copy_(bias * scale + shift)
    return fused.to(conv.weight.device)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """A copy of ``net`` in eval mode with every Conv2d -> BatchNorm2d pair (adjacent in a
    Sequential, dropout in between allowed) fused into one Conv2d."""
    net = copy.deepcopy(net).eval()
    for seq in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        last_conv: int | None = None
        for i, m in enumerate(list(seq)):
            if isinstance(m, nn.Conv2d):
                last_conv = i
            elif isinstance(m, nn.BatchNorm2d) and last_conv is not None:
                seq[last_conv] = _fold(seq[last_conv], m)  # type: ignore[arg-type]
                seq[i] = nn.Identity()
                last_conv = None
            elif not isinstance(m, nn.Dropout | nn.Identity):
                last_conv = None
    return net
