"""The arithmetic cost of a net: multiply-adds per input, counted on a real forward pass.

Convolutions and linear layers dominate the descriptor nets; the per-patch normalisations,
poolings and activations add a few operations per pixel and are left out, as is usual when
nets are compared by multiply-adds (MACs).
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    """Multiply-adds of one Conv2d call per sample: every output value costs
    ``in_channels / groups x kh x kw`` of them. Shape: out (N,C,H,W)."""
    kh, kw = m.kernel_size
    per_output = (m.in_channels // m.groups) * kh * kw
    return int(out[0].numel()) * per_output


def _linear_macs(m: nn.Linear, out: torch.Tensor) -> int:
    return int(out[0].numel()) * m.in_features


def count_macs(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds per sample of ``net`` on an input of ``input_shape`` (without the batch
    dimension, e.g. (1, 32, 32)), summed over every Conv2d and Linear call of one forward pass
    in eval mode (a layer called twice counts twice). The net's own parameters and device are
    used; its training mode is restored afterwards.

    Shape: input_shape (C,H,W) -> int.
    """
    total = 0

    def hook(m: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += _conv_macs(m, out)
        elif isinstance(m, nn.Linear):
            total += _linear_macs(m, out)

    handles = [
        m.register_forward_hook(hook)  # type: ignore[arg-type]
        for m in net.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was_training = net.training
    param = next(net.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        net.eval()
        with torch.inference_mode():
            net(torch.rand(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return total
