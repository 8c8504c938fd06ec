"""Augmentation of a batch of pairs on the device (flips, quarter turns, small rotations and
scalings: one affine map per patch)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def augment_pairs(
    x: Tensor,
    gen: torch.Generator,
    flip_rot90: bool = True,
    rotation_jitter: float = 5.0,
    scale_jitter: float = 0.05,
) -> Tensor:
    """Augment a batch of pairs: the same random horizontal flip and 90-degree rotation for
    both patches of a pair (they keep corresponding), then an independent rotation uniform in
    ``+-rotation_jitter`` degrees and a scale log-uniform in ``1/(1+s) .. 1+s`` for every patch.
    All of it is one affine map per patch and one ``grid_sample`` (bilinear, reflected border;
    flips and quarter turns alone land on pixel centres). Random numbers come from ``gen`` (a
    CPU generator), so a step's augmentation does not depend on the device.

    Shape: (B,2,P,P) float -> (B,2,P,P) float.
    """
    b, two, p, _ = x.shape
    if not flip_rot90 and rotation_jitter <= 0 and scale_jitter <= 0:
        return x
    n = b * two
    eye = torch.eye(2).expand(b, 2, 2)
    d = eye
    if flip_rot90:
        quarter = torch.randint(0, 4, (b,), generator=gen).double() * (math.pi / 2)
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        c, s = torch.cos(quarter).round().float(), torch.sin(quarter).round().float()
        d = torch.stack([torch.stack([c * flip, -s], 1), torch.stack([s * flip, c], 1)], 1)
    d = d.repeat_interleave(two, dim=0)  # (n,2,2): the same for both patches of a pair
    if rotation_jitter > 0 or scale_jitter > 0:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(rotation_jitter)
        sc = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log1p(scale_jitter))
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        j = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        d = j @ d
    theta = torch.cat([d, torch.zeros(n, 2, 1)], 2).to(x.device, x.dtype)
    grid = F.affine_grid(theta, [n, 1, p, p], align_corners=False)
    return F.grid_sample(
        x.reshape(n, 1, p, p), grid, mode="bilinear", padding_mode="reflection", align_corners=False
    ).view(b, two, p, p)
