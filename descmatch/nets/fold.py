"""Inference form of a trained net: batch norm folded into the convolutions before it.

The folded copy computes the same function as the net in eval mode (up to rounding) with
one fewer pass over every feature map per layer.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """torch's own Conv-BN fusion (eval mode; BN without affine parameters is handled)."""
    fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
    assert isinstance(fused, nn.Conv2d)
    return fused


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
