"""Cutting oriented, antialiased patches around keypoints, all of an image in one batch.

The window side in image pixels is ``mr_size x size`` (OpenCV keypoint size). Each keypoint
is sampled from the Gaussian pyramid level whose pixel is closest to the patch pixel, so a
large window is never point-sampled (no aliasing). Patches are rotated so that the keypoint
orientation points along the patch's +x axis, unless the keypoints are upright (angle 0).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MR_SIZE = 10.0

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur with the 5-tap binomial kernel and keep even pixels (OpenCV's pyrDown).

    Pixel i of the output is centred on pixel 2i of the input. Shape: (B,C,H,W) ->
    (B,C,ceil(H/2),ceil(W/2)).
    """
    k = _BINOMIAL.to(x.device, x.dtype)
    c = x.shape[1]
    kx = k.view(1, 1, 1, 5).repeat(c, 1, 1, 1)
    ky = k.view(1, 1, 5, 1).repeat(c, 1, 1, 1)
    pw = min(2, x.shape[3] - 1)
    ph = min(2, x.shape[2] - 1)
    x = F.pad(x, (pw, pw, 0, 0), mode="reflect") if pw > 0 else F.pad(x, (2, 2, 0, 0), "replicate")
    x = F.conv2d(x, kx[..., 2 - pw: 3 + pw] if pw < 2 else kx, groups=c)
    x = F.pad(x, (0, 0, ph, ph), mode="reflect") if ph > 0 else F.pad(x, (0, 0, 2, 2), "replicate")
    x = F.conv2d(x, ky[..., 2 - ph: 3 + ph, :] if ph < 2 else ky, groups=c)
    return x[:, :, ::2, ::2]


def build_pyramid(image: torch.Tensor, min_side: int = 16) -> list[torch.Tensor]:
    """Gaussian pyramid, halving until the shorter side would drop below ``min_side``.

    Shape: image (H,W) -> list of (1,1,H_l,W_l).
    """
    levels = [image[None, None]]
    while min(levels[-1].shape[-2:]) // 2 >= min_side:
        levels.append(pyr_down(levels[-1]))
    return levels


def extract_patches(
    image: torch.Tensor | np.ndarray,
    xy: np.ndarray | torch.Tensor,
    size: np.ndarray | torch.Tensor,
    angle: np.ndarray | torch.Tensor | None = None,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: float = 1.0,
    pyramid: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sample one patch per keypoint.

    ``window_factor`` widens the window (the central-surround net sees twice the window).
    Coordinates: pixel centres at integers. Angle: degrees, OpenCV's convention.
    Shape: image (H,W) float in [0,1]; xy (N,2); size, angle (N,) -> (N,1,P,P) float32 on the
    image's device.
    """
    img = torch.as_tensor(image, dtype=torch.float32)
    device = img.device
    if img.ndim != 2:
        raise ValueError(f"image must be (H,W), got {tuple(img.shape)}")
    xy_t = torch.as_tensor(xy, dtype=torch.float32, device=device).reshape(-1, 2)
    n = xy_t.shape[0]
    if n == 0:
        return torch.zeros((0, 1, patch_size, patch_size), device=device)
    size_t = torch.as_tensor(size, dtype=torch.float32, device=device).reshape(n)
    ang_t = (torch.zeros(n, device=device) if angle is None else
             torch.as_tensor(angle, dtype=torch.float32, device=device).reshape(n))
    levels = pyramid if pyramid is not None else build_pyramid(img)

    window = size_t * (mr_size * window_factor)  # side in level-0 pixels
    step = (window / patch_size).clamp_min(1e-6)  # level-0 pixels per patch pixel
    level = torch.round(torch.log2(step)).clamp(0, len(levels) - 1).long()

    # Patch pixel centres, offsets from the keypoint in units of the window: (P*P, 2).
    r = (torch.arange(patch_size, device=device, dtype=torch.float32) + 0.5) / patch_size - 0.5
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    base = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    # OpenCV angles are clockwise on screen (y down) : rotating the patch axes by the angle
    # makes the keypoint orientation the patch's +x axis.
    t = torch.deg2rad(ang_t)
    cos, sin = torch.cos(t), torch.sin(t)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (N,2,2)
    offs = torch.einsum("nij,pj->npi", rot, base) * window.view(n, 1, 1)  # (N,P*P,2)
    pts = xy_t.view(n, 1, 2) + offs  # level-0 pixel coordinates

    out = torch.empty((n, 1, patch_size, patch_size), device=device)
    for lvl in torch.unique(level).tolist():
        idx = torch.nonzero(level == lvl).squeeze(1)
        im = levels[lvl]
        h, w = im.shape[-2:]
        p = pts[idx] / float(2**lvl)
        gxn = (p[..., 0] + 0.5) / w * 2 - 1
        gyn = (p[..., 1] + 0.5) / h * 2 - 1
        grid = torch.stack([gxn, gyn], -1).view(1, -1, patch_size, 2)
        s = F.grid_sample(im, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out[idx] = s.view(-1, 1, patch_size, patch_size)
    return out


def pyramid_levels_for(size: float, mr_size: float, patch_size: int = 32) -> int:
    """The pyramid level a keypoint of this size is sampled from (for documentation/tests)."""
    return max(0, round(math.log2(max(size * mr_size / patch_size, 1e-6))))
