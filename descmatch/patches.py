"""Cutting oriented, antialiased patches around keypoints, all of an image in one batch.

The window side in image pixels is ``mr_size x size`` (OpenCV keypoint size). Each keypoint
is sampled from the Gaussian pyramid level whose pixel is closest to the patch pixel, so a
large window is never point-sampled (no aliasing). Patches are rotated so that the keypoint
orientation points along the patch's +x axis, unless the keypoints are upright (angle 0).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_MR_SIZE = 10.0

#: How many keypoint windows (``mr_size x size``) a patch spans: one factor, or one per view
#: of a multi-view net (its patches, one per factor, stacked as channels).
WindowFactor = float | tuple[float, ...]
_CPU_CHUNK_BYTES = 16 << 20  # the sampling grid of a chunk of keypoints (CPU)

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _reflect101(i: int, n: int) -> int:
    """OpenCV's BORDER_REFLECT_101 index (cv::borderInterpolate): ...c b | a b c | b a..."""
    if n == 1:
        return 0
    while not 0 <= i < n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur with the 5-tap binomial kernel and keep even pixels (OpenCV's pyrDown).

    Pixel i of the output is centred on pixel 2i of the input; borders are reflected without
    repeating the edge pixel (OpenCV's BORDER_REFLECT_101), at any size. Shape: (B,C,H,W) ->
    (B,C,ceil(H/2),ceil(W/2)).
    """
    k = _BINOMIAL.to(x.device, x.dtype)
    c = x.shape[1]
    for dim in (3, 2):
        n = x.shape[dim]
        idx = [_reflect101(i, n) for i in range(-2, n + 2)]
        x = x.index_select(dim, torch.tensor(idx, device=x.device))
        w = k.view(1, 1, 1, 5) if dim == 3 else k.view(1, 1, 5, 1)
        x = F.conv2d(x, w.repeat(c, 1, 1, 1), groups=c)
    return x[:, :, ::2, ::2]


def build_pyramid(image: torch.Tensor, min_side: int = 16) -> list[torch.Tensor]:
    """Gaussian pyramid, halving until the shorter side would drop below ``min_side``.

    On the CPU (no autograd, float32/float64) the levels come from OpenCV's pyrDown, which
    :func:`pyr_down` reproduces (to float rounding) on other devices. Shape: image (H,W) ->
    list of (1,1,H_l,W_l).
    """
    levels = [image[None, None]]
    if min(image.shape[-2:]) // 2 < min_side:
        return levels
    if (
        image.device.type == "cpu"
        and image.dtype in (torch.float32, torch.float64)
        and not (image.requires_grad and torch.is_grad_enabled())
    ):
        a = np.ascontiguousarray(image.detach().numpy())
        while min(a.shape) // 2 >= min_side:
            a = cv2.pyrDown(a)
            levels.append(torch.from_numpy(a)[None, None])
        return levels
    while min(levels[-1].shape[-2:]) // 2 >= min_side:
        levels.append(pyr_down(levels[-1]))
    return levels


def _atlas_layout(
    shapes: list[tuple[int, int]], pad: int
) -> tuple[int, int, list[tuple[int, int]]]:
    """Where each level goes in the atlas: level 0 on the left, the others stacked in a column
    on its right, each with a ``pad``-pixel margin. -> (height, width, [(top, left)] of each
    level's pixel (0, 0))."""
    h0, w0 = shapes[0]
    origins = [(pad, pad)]
    x, y = w0 + 2 * pad, 0
    for h, _ in shapes[1:]:
        origins.append((y + pad, x + pad))
        y += h + 2 * pad
    width = x + max((w + 2 * pad for _, w in shapes[1:]), default=0)
    return max(h0 + 2 * pad, y), width, origins


def _fill_atlas(atlas: Any, levels: list[Any], origins: list[tuple[int, int]], pad: int) -> None:
    """Copy each (H_l,W_l) level into ``atlas`` at its origin and fill its margin with its
    border pixels (replicate), so that bilinear sampling anywhere within the margin equals
    sampling the level alone with its border pixels extended (grid_sample's "border"
    padding). Works on numpy arrays and on tensors alike."""
    for lv, (y, x) in zip(levels, origins, strict=True):
        h, w = lv.shape
        blk = atlas[y - pad : y + h + pad, x - pad : x + w + pad]
        blk[pad : pad + h, pad : pad + w] = lv
        blk[pad : pad + h, :pad] = lv[:, :1]
        blk[pad : pad + h, pad + w :] = lv[:, w - 1 :]
        blk[:pad] = blk[pad : pad + 1]
        blk[pad + h :] = blk[pad + h - 1 : pad + h]


def _atlas(
    levels: list[torch.Tensor], pad: int, use_numpy: bool
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """All pyramid levels in one (H,W) float32 image (see :func:`_fill_atlas`) -> (atlas,
    [(top, left)] of each level). ``use_numpy`` (CPU, no autograd): plain numpy copies."""
    planes = [lv.reshape(lv.shape[-2:]) for lv in levels]
    height, width, origins = _atlas_layout([(p.shape[0], p.shape[1]) for p in planes], pad)
    if use_numpy:
        atlas_np = np.zeros((height, width), np.float32)
        _fill_atlas(atlas_np, [p.detach().numpy() for p in planes], origins, pad)
        return torch.from_numpy(atlas_np), origins
    atlas = torch.zeros((height, width), dtype=torch.float32, device=planes[0].device)
    _fill_atlas(atlas, [p.to(torch.float32) for p in planes], origins, pad)
    return atlas, origins


@functools.cache
def _remap_is_exact() -> bool:
    """Whether this OpenCV's cv2.remap (INTER_LINEAR, float32 image and maps) interpolates at
    the exact map positions, like grid_sample (recent OpenCV does; older versions round the
    positions to 1/32 pixel, INTER_BITS)."""
    rng = np.random.default_rng(0)
    src = rng.random((8, 8)).astype(np.float32)
    pos = rng.uniform(0, 6.99, (16, 16, 2)).astype(np.float32)
    got = cv2.remap(src, pos, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    p = pos.astype(np.float64)
    x0, y0 = np.floor(p[..., 0]).astype(int), np.floor(p[..., 1]).astype(int)
    fx, fy = p[..., 0] - x0, p[..., 1] - y0
    s = src.astype(np.float64)
    ref = (1 - fy) * ((1 - fx) * s[y0, x0] + fx * s[y0, x0 + 1]) + fy * (
        (1 - fx) * s[y0 + 1, x0] + fx * s[y0 + 1, x0 + 1]
    )
    return bool(np.abs(got - ref).max() < 1e-5)


def window_span(window_factor: WindowFactor) -> float:
    """The widest window a (multi-view) cut spans, in keypoint windows."""
    return max(window_factor) if isinstance(window_factor, tuple) else float(window_factor)


def view_shape(patch_size: int, window_factor: WindowFactor) -> tuple[int, ...]:
    """One keypoint's patch as stored in the pools: (P,P), or (V,P,P) for V views."""
    if isinstance(window_factor, tuple):
        return (len(window_factor), patch_size, patch_size)
    return (patch_size, patch_size)


def window_factor_of(value: Any) -> WindowFactor:
    """A window factor as read from JSON (a number or a list) -> float or tuple."""
    if isinstance(value, list | tuple):
        return tuple(float(v) for v in value)
    return float(value)


def patches_to_uint8(patches: torch.Tensor) -> np.ndarray:
    """Patches as stored in the training pools: rounded to grey levels, one channel squeezed.
    Shape: (N,1,P,P) float in [0,1] -> (N,P,P) uint8; (N,V,P,P), V > 1 -> (N,V,P,P)."""
    one = patches[:, 0] if patches.shape[1] == 1 else patches
    return (one * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8).cpu().numpy()


def extract_patches(
    image: torch.Tensor | np.ndarray,
    xy: np.ndarray | torch.Tensor,
    size: np.ndarray | torch.Tensor,
    angle: np.ndarray | torch.Tensor | None = None,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: WindowFactor = 1.0,
    pyramid: list[torch.Tensor] | None = None,
    shape: np.ndarray | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one patch per keypoint (one per window factor when ``window_factor`` is a tuple:
    the views of a multi-view net, each ``patch_size`` wide, stacked as channels).

    ``shape`` (N,2,2), determinant 1, makes the window an ellipse: patch offsets r map to
    image offsets ``k * shape @ R(angle) @ r`` (an affine frame; ``angle`` is then measured in
    the normalised frame).

    ``window_factor`` widens the window (the central-surround net sees twice the window).
    Coordinates: pixel centres at integers. Angle: degrees, OpenCV's convention.
    Shape: image (H,W) float in [0,1]; xy (N,2); size, angle (N,) -> (N,1,P,P) float32 on the
    image's device; (N,V,P,P) for V window factors.
    """
    if isinstance(window_factor, tuple):
        levels = (
            pyramid
            if pyramid is not None
            else build_pyramid(torch.as_tensor(image, dtype=torch.float32))
        )
        views = [
            extract_patches(image, xy, size, angle, patch_size, mr_size, f, levels, shape)
            for f in window_factor
        ]
        return torch.cat(views, 1)
    img = torch.as_tensor(image, dtype=torch.float32)
    device = img.device
    if img.ndim != 2:
        raise ValueError(f"image must be (H,W), got {tuple(img.shape)}")
    xy_t = torch.as_tensor(xy, dtype=torch.float32, device=device).reshape(-1, 2)
    n = xy_t.shape[0]
    if n == 0:
        return torch.zeros((0, 1, patch_size, patch_size), device=device)
    size_t = torch.as_tensor(size, dtype=torch.float32, device=device).reshape(n)
    ang_t = (
        torch.zeros(n, device=device)
        if angle is None
        else torch.as_tensor(angle, dtype=torch.float32, device=device).reshape(n)
    )
    levels = pyramid if pyramid is not None else build_pyramid(img)

    window = size_t * (mr_size * window_factor)  # side in level-0 pixels
    step = (window / patch_size).clamp_min(1e-6)  # level-0 pixels per patch pixel
    level = torch.round(torch.log2(step)).clamp(0, len(levels) - 1).long()

    # All levels go into one image (an atlas), each with a margin of its replicated border
    # pixels wide enough for every patch whose keypoint lies in the image, so that one
    # sampling call serves all levels. On the CPU (no autograd) the sampling is cv2.remap,
    # where it interpolates exactly (faster than grid_sample); else grid_sample.
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (img, xy_t, size_t, ang_t, *levels)
    )
    cpu = device.type == "cpu" and not grad
    pad = patch_size + 2
    atlas, origins = _atlas(levels, pad, use_numpy=cpu)
    ah, aw = atlas.shape
    remap = cpu and max(ah, aw) < 32767 and _remap_is_exact()  # cv2: coordinates < SHRT_MAX

    # (Small ops: index_select and polar run serially at this size, indexing and cos/sin in
    # threads, which costs more than it saves when the cores are busy.)
    table = torch.tensor(
        [[lv.shape[-1], lv.shape[-2], x, y] for lv, (y, x) in zip(levels, origins, strict=True)],
        dtype=torch.float32,
    )
    table = table.to(device).index_select(0, level)
    lvl_wh, lvl_org = table[:, :2], table[:, 2:]  # (N,2) level size and origin, (x, y)
    inv = torch.exp2(-level.to(torch.float32))  # level pixels per level-0 pixel
    # OpenCV angles are clockwise on screen (y down): rotating the patch axes by the angle
    # makes the keypoint orientation the patch's +x axis. Patch pixel (i, j), at offset
    # (r_j, r_i) from the keypoint in units of the window, samples level pixel
    # centre + k R (r_j, r_i), R = [[cos, -sin], [sin, cos]], k the window in level pixels;
    # then atlas pixel, then (grid_sample) [-1, 1] with align_corners=False.
    r = (torch.arange(patch_size, device=device, dtype=torch.float32) + 0.5) / patch_size - 0.5
    rot = torch.polar(torch.ones_like(ang_t), torch.deg2rad(ang_t))
    cos, sin = rot.real, rot.imag
    k = window * inv
    centre = xy_t * inv[:, None]  # (N,2) level pixels
    if remap:
        norm, shift = torch.ones(2, device=device), torch.zeros(2, device=device)
    else:
        norm = torch.tensor([2.0 / aw, 2.0 / ah], device=device)
        shift = norm / 2 - 1
    kn = k[:, None] * norm
    # As complex numbers (x + iy): grid[n, i, j] = u[n, j] + v[n, i] with u[n, j] = c[n] +
    # a[n] r_j and v[n, i] = b[n] r_i, c the centre, a and b the patch axes (normalised).
    axes = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (N,2,2)
    if shape is not None:  # each axis (a row) through the affine shape
        shp = torch.as_tensor(shape, dtype=torch.float32, device=device).reshape(n, 2, 2)
        axes = axes @ shp.transpose(1, 2)
    ab = axes * kn[:, None, :]
    c0 = torch.zeros_like(ab)
    c0[:, 0] = (centre + lvl_org) * norm + shift
    uv = torch.addcmul(
        torch.view_as_complex(c0)[:, :, None],
        torch.view_as_complex(ab)[:, :, None],
        r.to(torch.complex64),
    )  # (N,2,P)
    u, v = uv[:, 0, None, :], uv[:, 1, :, None]  # (N,1,P), (N,P,1)
    # Patches reaching past the margin (keypoint off the image, or a window too large for
    # the top level) get their samples clamped to the level, as "border" padding does (NaN
    # positions too: a sample stays finite).
    half = k[:, None] * (0.5 * (patch_size - 1) / patch_size) * axes.abs().sum(1)
    outside = ~((centre - half >= 1 - pad) & (centre + half <= lvl_wh + (pad - 2))).all(1)
    any_outside = bool(outside.any())
    gmin = (lvl_org - 0.5) * norm + shift  # level pixels -0.5 and size - 0.5
    gmax = (lvl_org + lvl_wh - 0.5) * norm + shift

    # On the CPU the grid is built and sampled a few MB at a time: it stays in cache and its
    # memory is reused (glibc maps and unmaps large blocks, each page faulting anew).
    chunk = max(1, _CPU_CHUNK_BYTES // (8 * patch_size**2)) if device.type == "cpu" else n
    bufc = (
        None
        if grad
        else torch.empty(
            (min(n, chunk), patch_size, patch_size), dtype=torch.complex64, device=device
        )
    )
    if remap:
        atlas_np = atlas.numpy()
        out_np = np.empty((n, patch_size * patch_size), np.float32)
    outs = []
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        # The complex add runs along j, vectorised (a float add would run over pairs).
        gridc = u[s:e] + v[s:e] if bufc is None else torch.add(u[s:e], v[s:e], out=bufc[: e - s])
        grid = torch.view_as_real(gridc)  # (n,P,P,2): x, y
        if any_outside:
            idx = torch.nonzero(outside[s:e]).squeeze(1)
            if len(idx):
                lo, hi = gmin[s:e][idx][:, None, None], gmax[s:e][idx][:, None, None]
                g = grid[idx]
                g = torch.maximum(torch.minimum(torch.where(g.isnan(), hi, g), hi), lo)
                grid = grid.index_put((idx,), g)
        if remap:
            dst = out_np[s:e]
            res = cv2.remap(
                atlas_np,
                grid.numpy().reshape(e - s, -1, 2),
                None,
                cv2.INTER_LINEAR,
                dst=dst,
                borderMode=cv2.BORDER_REPLICATE,
            )
            if res is not dst:
                dst[...] = res
        else:
            outs.append(
                F.grid_sample(
                    atlas[None, None],
                    grid.reshape(1, -1, patch_size, 2),
                    mode="bilinear",
                    padding_mode="border",
                    align_corners=False,
                )
            )
    if remap:
        return torch.from_numpy(out_np).view(n, 1, patch_size, patch_size)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out.view(n, 1, patch_size, patch_size)


def pyramid_levels_for(size: float, mr_size: float, patch_size: int = 32) -> int:
    """The pyramid level a keypoint of this size is sampled from (for documentation/tests)."""
    return max(0, round(math.log2(max(size * mr_size / patch_size, 1e-6))))
