"""The sampling paths of extract_patches agree with the plain per-level algorithm.

extract_patches packs every pyramid level into one image (an atlas, each level with a margin
of its replicated border pixels) and samples all keypoints at once: with cv2.remap on the
CPU, with grid_sample elsewhere (CUDA, autograd, or an OpenCV whose remap rounds positions).
build_pyramid uses cv2.pyrDown on the CPU and pyr_down elsewhere. Each path is checked here
against a reference: one grid_sample call per pyramid level on that level alone ("border"
padding), the algorithm as first written.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from descmatch import patches
from descmatch.detect import SiftDetector
from descmatch.examples import render_scene
from descmatch.patches import DEFAULT_MR_SIZE, build_pyramid, extract_patches, pyr_down

TOL = 5e-4  # float32 rounding of the sampling positions (atlas vs per-level coordinates)


def reference_patches(
    levels: list[torch.Tensor],
    xy: np.ndarray,
    size: np.ndarray,
    angle: np.ndarray | None,
    patch_size: int = 32,
    mr_size: float = DEFAULT_MR_SIZE,
    window_factor: float = 1.0,
) -> torch.Tensor:
    """One grid_sample per pyramid level, "border" padding on the level alone."""
    xy_t = torch.as_tensor(xy, dtype=torch.float32).reshape(-1, 2)
    n = xy_t.shape[0]
    size_t = torch.as_tensor(size, dtype=torch.float32).reshape(n)
    ang_t = (
        torch.zeros(n) if angle is None else torch.as_tensor(angle, dtype=torch.float32).reshape(n)
    )
    window = size_t * (mr_size * window_factor)
    step = (window / patch_size).clamp_min(1e-6)
    level = torch.round(torch.log2(step)).clamp(0, len(levels) - 1).long()
    r = (torch.arange(patch_size, dtype=torch.float32) + 0.5) / patch_size - 0.5
    gy, gx = torch.meshgrid(r, r, indexing="ij")
    base = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    t = torch.deg2rad(ang_t)
    cos, sin = torch.cos(t), torch.sin(t)
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
    pts = xy_t.view(n, 1, 2) + torch.einsum("nij,pj->npi", rot, base) * window.view(n, 1, 1)
    out = torch.empty((n, 1, patch_size, patch_size))
    for lvl in torch.unique(level).tolist():
        idx = torch.nonzero(level == lvl).squeeze(1)
        im = levels[lvl].to(torch.float32)
        h, w = im.shape[-2:]
        p = pts[idx] / float(2**lvl)
        grid = torch.stack([(p[..., 0] + 0.5) / w * 2 - 1, (p[..., 1] + 0.5) / h * 2 - 1], -1)
        s = F.grid_sample(
            im,
            grid.view(1, -1, patch_size, 2),
            mode="bilinear",
            padding_mode="border",
            align_corners=False,
        )
        out[idx] = s.view(-1, 1, patch_size, patch_size)
    return out


def torch_pyramid(image: torch.Tensor, min_side: int = 16) -> list[torch.Tensor]:
    levels = [image[None, None]]
    while min(levels[-1].shape[-2:]) // 2 >= min_side:
        levels.append(pyr_down(levels[-1]))
    return levels


PATHS = ["remap", "grid_sample", "autograd"]


def run_path(
    path: str, monkeypatch: pytest.MonkeyPatch, img: np.ndarray, *args: object, **kw: object
) -> torch.Tensor:
    """extract_patches through one sampling path on the CPU."""
    if path == "remap":
        if not patches._remap_is_exact():
            pytest.skip("this OpenCV's remap rounds the sample positions")
        with torch.inference_mode():
            return extract_patches(img, *args, **kw)
    if path == "grid_sample":
        with monkeypatch.context() as m:
            m.setattr(patches, "_remap_is_exact", lambda: False)
            return extract_patches(img, *args, **kw)
    t = torch.tensor(img, requires_grad=True)  # autograd: torch atlas and grid_sample
    kw = dict(kw)
    if kw.get("pyramid") is not None:
        kw["pyramid"] = [lv.clone().requires_grad_(True) for lv in kw["pyramid"]]
    p = extract_patches(t, *args, **kw)
    assert p.requires_grad
    return p.detach()


def scene_keypoints(
    h: int, w: int, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    img = render_scene(max(w, 64), max(h, 64), seed=seed)[:h, :w].astype(np.float32) / 255
    kps = SiftDetector(max_keypoints=n)(np.ascontiguousarray(img))
    return np.ascontiguousarray(img), kps.xy, kps.size, kps.angle


def border_keypoints(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keypoints on, near and off the image borders and corners, tiny to huge windows."""
    rng = np.random.default_rng(seed)
    xs = np.array(
        [-40.0, -3.0, -0.5, 0.0, 0.3, 2.0, w / 2, w - 3.0, w - 1.0, w - 0.7, w + 5.0, w + 60.0]
    )
    ys = np.array([-25.0, -1.0, 0.0, 1.5, h / 2, h - 1.0, h - 0.2, h + 30.0])
    xy = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    xy = np.concatenate([xy, rng.uniform([0, 0], [w - 1, h - 1], (40, 2))]).astype(np.float32)
    size = rng.choice([0.5, 2.0, 5.0, 13.0, 40.0, 150.0, 1000.0], len(xy)).astype(np.float32)
    angle = rng.uniform(0, 360, len(xy)).astype(np.float32)
    return xy, size, angle


# -- every path against the per-level reference ----------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "patch_size,mr_size,window_factor,upright",
    [
        (32, DEFAULT_MR_SIZE, 1.0, False),
        (32, 6.0, 1.0, True),
        (64, DEFAULT_MR_SIZE, 2.0, False),
        (16, 12.0, 1.0, False),
    ],
)
def test_scene_keypoints_match_the_per_level_reference(
    path: str,
    patch_size: int,
    mr_size: float,
    window_factor: float,
    upright: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    img, xy, size, angle = scene_keypoints(241, 319, 400)
    angle = None if upright else angle
    pyr = torch_pyramid(torch.from_numpy(img))
    ref = reference_patches(pyr, xy, size, angle, patch_size, mr_size, window_factor)
    got = run_path(
        path, monkeypatch, img, xy, size, angle, patch_size, mr_size, window_factor, pyramid=pyr
    )
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max() < TOL
    # Without a given pyramid (cv2.pyrDown on the CPU): the same to float rounding.
    got2 = run_path(path, monkeypatch, img, xy, size, angle, patch_size, mr_size, window_factor)
    assert (got2 - ref).abs().max() < TOL


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("hw", [(37, 53), (64, 64), (33, 130), (20, 17), (5, 7), (1, 9)])
def test_border_off_image_and_huge_keypoints_match_the_reference(
    path: str, hw: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    h, w = hw
    img = np.random.default_rng(h * w).random((h, w)).astype(np.float32)
    xy, size, angle = border_keypoints(h, w)
    ref = reference_patches(torch_pyramid(torch.from_numpy(img)), xy, size, angle)
    got = run_path(path, monkeypatch, img, xy, size, angle)
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max() < TOL


@pytest.mark.parametrize("path", PATHS)
def test_a_given_partial_pyramid_is_used_as_is(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img, xy, size, angle = scene_keypoints(200, 260, 200, seed=2)
    size = size * 4  # most would come from level 1 and up
    for pyr in ([torch.from_numpy(img)[None, None]], torch_pyramid(torch.from_numpy(img))[:2]):
        ref = reference_patches(pyr, xy, size, angle)
        got = run_path(path, monkeypatch, img, xy, size, angle, pyramid=pyr)
        assert (got - ref).abs().max() < TOL


@pytest.mark.parametrize("path", PATHS)
def test_zero_keypoints_on_every_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    img = np.zeros((40, 50), np.float32)
    if path == "autograd":
        p = extract_patches(
            torch.zeros(40, 50, requires_grad=True), np.zeros((0, 2)), np.zeros(0), np.zeros(0)
        )
    else:
        p = run_path(path, monkeypatch, img, np.zeros((0, 2)), np.zeros(0), np.zeros(0))
    assert p.shape == (0, 1, 32, 32)


def test_chunks_give_the_same_patches(monkeypatch: pytest.MonkeyPatch) -> None:
    img, xy, size, angle = scene_keypoints(241, 319, 500, seed=1)
    xy[:7] = [[-50, 10], [400, 30], [5, -60], [100, 300], [0, 0], [318, 240], [-1, 241]]
    whole = extract_patches(img, xy, size, angle)
    for chunk_keypoints in (1, 7, 64, 333):
        monkeypatch.setattr(patches, "_CPU_CHUNK_BYTES", 8 * 32 * 32 * chunk_keypoints)
        assert torch.equal(extract_patches(img, xy, size, angle), whole)
        with monkeypatch.context() as m:
            m.setattr(patches, "_remap_is_exact", lambda: False)
            assert (extract_patches(img, xy, size, angle) - whole).abs().max() < TOL


def test_gradients_flow_to_the_image_as_in_the_reference() -> None:
    img, xy, size, angle = scene_keypoints(120, 150, 60, seed=4)
    weights = torch.rand(len(xy), 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t0 = torch.tensor(img, requires_grad=True)
    (extract_patches(t0, xy, size, angle) * weights).sum().backward()
    t1 = torch.tensor(img, requires_grad=True)
    (reference_patches(torch_pyramid(t1), xy, size, angle) * weights).sum().backward()
    assert t0.grad is not None and t1.grad is not None
    assert t1.grad.abs().sum() > 0
    assert (t0.grad - t1.grad).abs().max() < 1e-3 * t1.grad.abs().max()


# -- the atlas and the pyramid ---------------------------------------------------------------
def test_atlas_numpy_and_torch_fills_agree_and_replicate_the_borders() -> None:
    rng = np.random.default_rng(0)
    levels = [
        torch.from_numpy(rng.random((h, w)).astype(np.float32))[None, None]
        for h, w in [(37, 53), (19, 27), (10, 14), (1, 1)]
    ]
    a_np, org_np = patches._atlas(levels, 5, use_numpy=True)
    a_t, org_t = patches._atlas(levels, 5, use_numpy=False)
    assert org_np == org_t and torch.equal(a_np, a_t)
    for lv, (y, x) in zip(levels, org_np, strict=True):
        h, w = lv.shape[-2:]
        block = a_np[y - 5 : y + h + 5, x - 5 : x + w + 5]
        expect = F.pad(lv, (5, 5, 5, 5), mode="replicate")[0, 0]
        assert torch.equal(block, expect)
    # The blocks do not overlap: each level is intact after all were written.
    for lv, (y, x) in zip(levels, org_np, strict=True):
        h, w = lv.shape[-2:]
        assert torch.equal(a_np[y : y + h, x : x + w], lv[0, 0])


@pytest.mark.parametrize("hw", [(255, 257), (100, 300), (33, 65), (32, 32), (31, 400), (1024, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_pyramid_equals_the_torch_pyramid(hw: tuple[int, int], dtype: torch.dtype) -> None:
    img = torch.from_numpy(np.random.default_rng(1).random(hw)).to(dtype)
    fast, slow = build_pyramid(img), torch_pyramid(img)
    assert [lv.shape for lv in fast] == [lv.shape for lv in slow]
    for a, b in zip(fast, slow, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, atol=1e-6 if dtype == torch.float32 else 1e-12, rtol=0)
    # With autograd the torch path runs: the same levels.
    g = build_pyramid(img.clone().requires_grad_(True))
    assert all(torch.allclose(a, b.detach(), atol=1e-6) for a, b in zip(fast, g, strict=True))


@pytest.mark.parametrize("min_side", [1, 2, 3, 16])
def test_cpu_pyramid_down_to_tiny_levels(min_side: int) -> None:
    img = torch.from_numpy(np.random.default_rng(2).random((45, 23)).astype(np.float32))
    fast, slow = build_pyramid(img, min_side), torch_pyramid(img, min_side)
    assert [lv.shape for lv in fast] == [lv.shape for lv in slow]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_pyr_down_matches_opencv_at_tiny_sizes() -> None:
    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (1, 5), (5, 1), (2, 2), (2, 7), (3, 2), (3, 3), (4, 6)]:
        img = rng.random((h, w)).astype(np.float32)
        ours = pyr_down(torch.from_numpy(img)[None, None])[0, 0].numpy()
        ref = cv2.pyrDown(img)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_remap_check_detects_rounded_positions(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that picks cv2.remap tells exact interpolation from 1/32-pixel rounding."""
    patches._remap_is_exact.cache_clear()
    try:
        remap = cv2.remap

        def rounded(src: np.ndarray, m: np.ndarray, *a: object, **kw: object) -> np.ndarray:
            return remap(src, np.round(m * 32) / 32, *a, **kw)

        monkeypatch.setattr(patches.cv2, "remap", rounded)
        assert not patches._remap_is_exact()
    finally:
        patches._remap_is_exact.cache_clear()


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_keypoints_give_finite_patches(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = np.random.default_rng(5).random((60, 70)).astype(np.float32)
    xy = np.array([[np.nan, 5], [10, np.inf], [1e9, -1e9], [30, 30], [30, 30]], np.float32)
    size = np.array([10, 10, 10, np.inf, 10], np.float32)
    angle = np.array([0, 30, 200, 10, np.nan], np.float32)
    got = run_path(path, monkeypatch, img, xy, size, angle, patch_size=33)
    assert got.shape == (5, 1, 33, 33) and torch.isfinite(got).all()
    assert got.min() >= 0 and got.max() <= 1
