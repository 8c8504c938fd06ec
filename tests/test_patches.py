"""Oriented, antialiased patches: shapes, window scale and orientation conventions, rotation
equivariance, antialiasing, and the central-surround window."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from descmatch.detect import SiftDetector
from descmatch.examples import render_scene
from descmatch.patches import (
    DEFAULT_MR_SIZE,
    build_pyramid,
    extract_patches,
    patches_to_uint8,
    pyr_down,
    pyramid_levels_for,
    view_shape,
    window_factor_of,
    window_span,
)


def _disk_image(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A white anti-aliased disk on black (supersampled). Shape: (h,w) float32."""
    ss = 4
    y, x = np.mgrid[0 : h * ss, 0 : w * ss].astype(np.float32)
    x = (x + 0.5) / ss - 0.5
    y = (y + 0.5) / ss - 0.5
    inside = ((x - cx) ** 2 + (y - cy) ** 2 <= r * r).astype(np.float32)
    return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


# -- shapes ----------------------------------------------------------------------------------
def test_output_shape_and_dtype(scene: np.ndarray) -> None:
    img = scene.astype(np.float32) / 255
    xy = np.array([[50.0, 60.0], [100.5, 80.25], [0.0, 0.0], [319.0, 239.0]], np.float32)
    size = np.array([4.0, 10.0, 30.0, 8.0], np.float32)
    angle = np.array([0.0, 45.0, 200.0, 359.0], np.float32)
    p = extract_patches(img, xy, size, angle)
    assert p.shape == (4, 1, 32, 32) and p.dtype == torch.float32
    assert torch.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    p64 = extract_patches(torch.from_numpy(img), xy, size, None, patch_size=64, window_factor=2.0)
    assert p64.shape == (4, 1, 64, 64)


def test_zero_keypoints_give_an_empty_batch(scene: np.ndarray) -> None:
    img = scene.astype(np.float32) / 255
    p = extract_patches(
        img, np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32)
    )
    assert p.shape == (0, 1, 32, 32)
    assert extract_patches(img, np.zeros((0, 2)), np.zeros(0), patch_size=64).shape == (
        0,
        1,
        64,
        64,
    )


def test_rejects_colour_images() -> None:
    with pytest.raises(ValueError):
        extract_patches(np.zeros((10, 10, 3), np.float32), np.zeros((1, 2)), np.ones(1))


def test_default_window_is_documented_constant() -> None:
    # A uniform ramp: the patch spans exactly mr_size * size pixels along x.
    w = 400
    ramp = np.tile(np.arange(w, dtype=np.float32) / (w - 1), (64, 1))
    size = 4.0
    p = extract_patches(ramp, np.array([[200.0, 32.0]]), np.array([size]), np.array([0.0]))
    row = p[0, 0, 16].numpy() * (w - 1)  # image x of each patch column
    span = (row[-1] - row[0]) * 32 / 31
    assert span == pytest.approx(DEFAULT_MR_SIZE * size, rel=0.02)


# -- window scale and orientation ------------------------------------------------------------
@pytest.mark.parametrize(
    "size,mr_size", [(3.0, 6.0), (4.0, 10.0), (10.0, 6.0), (16.0, 10.0), (30.0, 6.0)]
)
def test_window_covers_mr_size_times_size(size: float, mr_size: float) -> None:
    window = mr_size * size
    r_patch = 9.0  # disk radius wanted in the patch
    r = r_patch * window / 32  # its radius in the image
    h, w = 400, 440
    cx, cy = 201.3, 187.6
    img = _disk_image(h, w, cx, cy, r)
    p = extract_patches(
        img, np.array([[cx, cy]], np.float32), np.array([size]), np.array([33.0]), mr_size=mr_size
    )[0, 0].numpy()
    # The level the window is sampled from, as documented.
    assert pyramid_levels_for(size, mr_size) == max(0, round(np.log2(window / 32)))
    radius = np.sqrt(p.sum() / np.pi)  # area of a (blurred) disk is preserved
    assert radius == pytest.approx(r * 32 / window, abs=0.5)
    area_radius = np.sqrt((p > 0.5).sum() / np.pi)
    assert abs(area_radius - r_patch) < 1.0
    # The keypoint is at the patch centre (between pixels 15 and 16).
    yy, xx = np.mgrid[0:32, 0:32]
    assert (p * xx).sum() / p.sum() == pytest.approx(15.5, abs=0.15)
    assert (p * yy).sum() / p.sum() == pytest.approx(15.5, abs=0.15)


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0, 135.0, 250.0])
def test_orientation_points_along_patch_x(angle: float) -> None:
    """OpenCV angles are clockwise on screen (y down): direction (cos a, sin a) in pixels.
    A dot placed in the keypoint's direction lands on the patch's +x axis."""
    h = w = 200
    cx, cy, dist = 100.0, 100.0, 18.0
    t = np.deg2rad(angle)
    img = _disk_image(h, w, cx + dist * np.cos(t), cy + dist * np.sin(t), 3.0)
    p = extract_patches(
        img, np.array([[cx, cy]]), np.array([10.0]), np.array([angle]), mr_size=6.0
    )[0, 0].numpy()
    yy, xx = np.mgrid[0:32, 0:32]
    col = (p * xx).sum() / p.sum()
    row = (p * yy).sum() / p.sum()
    assert row == pytest.approx(15.5, abs=0.3)
    assert col == pytest.approx(15.5 + dist * 32 / 60, abs=0.3)


# -- rotation equivariance -------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_scene() -> np.ndarray:
    """255x257: odd sides keep every pyramid level aligned under a 90-degree rotation."""
    return render_scene(320, 256, seed=3)[:255, :257].astype(np.float32) / 255


def test_rot90_with_exactly_mapped_keypoints_gives_the_same_patches(odd_scene: np.ndarray) -> None:
    img = odd_scene
    w = img.shape[1]
    rot = np.ascontiguousarray(np.rot90(img))  # (x, y) -> (y, W-1-x), angle -> angle - 90
    kps = SiftDetector(max_keypoints=300)(img)
    xy_rot = np.stack([kps.xy[:, 1], w - 1 - kps.xy[:, 0]], 1)
    p0 = extract_patches(img, kps.xy, kps.size, kps.angle)
    p1 = extract_patches(rot, xy_rot, kps.size, (kps.angle - 90.0) % 360.0)
    assert torch.allclose(p0, p1, atol=1e-4)
    # Rotating the other way round does not agree: the test can tell.
    wrong = extract_patches(rot, xy_rot, kps.size, (kps.angle + 90.0) % 360.0)
    assert (wrong - p0).abs().mean() > 0.05


def test_rot90_detected_keypoints_give_the_same_patches(odd_scene: np.ndarray) -> None:
    img = odd_scene
    w = img.shape[1]
    rot = np.ascontiguousarray(np.rot90(img))
    det = SiftDetector(max_keypoints=300)
    k0, k1 = det(img), det(rot)
    mapped = np.stack([k0.xy[:, 1], w - 1 - k0.xy[:, 0]], 1)
    dist = np.linalg.norm(mapped[:, None] - k1.xy[None], axis=2)
    pairs = []
    for i in range(len(k0)):
        for j in np.nonzero(dist[i] < 1.0)[0]:
            if abs(k1.size[j] - k0.size[i]) > 0.02 * k0.size[i]:
                continue
            da = (k0.angle[i] - 90.0 - k1.angle[j]) % 360.0
            if min(da, 360.0 - da) < 3.0:
                pairs.append((i, j))
    assert len(pairs) > 100
    i0, i1 = np.array(pairs).T
    p0 = extract_patches(img, k0.xy[i0], k0.size[i0], k0.angle[i0])
    p1 = extract_patches(rot, k1.xy[i1], k1.size[i1], k1.angle[i1])
    same = (p0 - p1).abs().mean(dim=(1, 2, 3))
    perm = np.random.default_rng(0).permutation(len(i1))
    random = (p0 - p1[perm]).abs().mean(dim=(1, 2, 3))
    assert same.median() < 0.2 * random.median()
    assert same.mean() < 0.3 * random.mean()
    # Ignoring the 90-degree difference (same angle on both) breaks the agreement.
    unrotated = extract_patches(rot, k1.xy[i1], k1.size[i1], k0.angle[i0])
    assert (p0 - unrotated).abs().mean(dim=(1, 2, 3)).median() > 3 * same.median()


# -- antialiasing ----------------------------------------------------------------------------
def test_large_window_on_checkerboard_is_not_aliased() -> None:
    n = 512
    y, x = np.mgrid[0:n, 0:n]
    board = (((x // 2) + (y // 2)) % 2).astype(np.float32)  # 2-px squares
    xy = np.array([[255.3, 250.7], [200.0, 300.0], [301.1, 180.4]], np.float32)
    size = np.full(3, 40.0, np.float32)  # 240-px window: 7.5 px per patch pixel
    angle = np.array([0.0, 20.0, 117.0], np.float32)
    p = extract_patches(board, xy, size, angle, mr_size=6.0)
    assert p.std(dim=(1, 2, 3)).max() < 0.03
    assert (p.mean(dim=(1, 2, 3)) - 0.5).abs().max() < 0.03
    # Control: the same sampling from the full-resolution image alone aliases.
    level0 = [build_pyramid(torch.from_numpy(board))[0]]
    aliased = extract_patches(board, xy, size, angle, mr_size=6.0, pyramid=level0)
    assert aliased.std(dim=(1, 2, 3)).min() > 0.15


def test_pyr_down_matches_opencv() -> None:
    rng = np.random.default_rng(0)
    for h, w in [(31, 40), (64, 64), (17, 9)]:
        img = rng.random((h, w)).astype(np.float32)
        ours = pyr_down(torch.from_numpy(img)[None, None])[0, 0].numpy()
        ref = cv2.pyrDown(img)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_pyramid_stops_at_min_side() -> None:
    levels = build_pyramid(torch.zeros(100, 300))
    assert [tuple(lv.shape[-2:]) for lv in levels] == [(100, 300), (50, 150), (25, 75)]
    assert len(build_pyramid(torch.zeros(5, 5))) == 1


# -- central surround ------------------------------------------------------------------------
@pytest.mark.parametrize("mr_size", [6.0, DEFAULT_MR_SIZE])
def test_central_surround_centre_crop_is_the_plain_patch(scene: np.ndarray, mr_size: float) -> None:
    img = scene.astype(np.float32) / 255
    kps = SiftDetector(max_keypoints=150)(img)
    p32 = extract_patches(img, kps.xy, kps.size, kps.angle, mr_size=mr_size)
    p64 = extract_patches(
        img, kps.xy, kps.size, kps.angle, patch_size=64, mr_size=mr_size, window_factor=2.0
    )
    assert p64.shape == (len(kps), 1, 64, 64)
    centre = p64[:, :, 16:48, 16:48]
    assert (centre - p32).abs().max() < 1e-3
    # The whole 64-px patch at half resolution is the 32-px patch of twice the window.
    p32_wide = extract_patches(img, kps.xy, kps.size, kps.angle, mr_size=2 * mr_size)
    surround = F.avg_pool2d(p64, 2)
    assert (surround - p32_wide).abs().mean() < 0.04
    assert (surround - p32).abs().mean() > 3 * (surround - p32_wide).abs().mean()


def test_window_factors_cut_one_view_each_from_one_pyramid(scene: np.ndarray) -> None:
    img = scene.astype(np.float32) / 255
    kps = SiftDetector(max_keypoints=120)(img)
    views = extract_patches(img, kps.xy, kps.size, kps.angle, mr_size=7.0, window_factor=(1, 2, 4))
    assert views.shape == (len(kps), 3, 32, 32)
    for i, f in enumerate((1, 2, 4)):
        one = extract_patches(img, kps.xy, kps.size, kps.angle, mr_size=7.0, window_factor=f)
        assert torch.equal(views[:, i : i + 1], one)
    # The widest view is the one-factor patch over four windows, from a coarser level.
    assert (views[:, 2] - views[:, 0]).abs().mean() > 0.02
    assert patches_to_uint8(views).shape == (len(kps), 3, 32, 32)
    assert patches_to_uint8(views[:, :1]).shape == (len(kps), 32, 32)
    assert view_shape(32, (1.0, 2.0, 4.0)) == (3, 32, 32) and view_shape(64, 2.0) == (64, 64)
    assert window_span((1.0, 2.0, 4.0)) == 4.0 and window_factor_of([1, 2]) == (1.0, 2.0)


def test_affine_shape_follows_an_affine_warp() -> None:
    """A patch cut with ``shape`` = L (det 1) from the image warped by L is the patch cut
    without it from the original: the window deforms with the image. The identity shape
    changes nothing; ignoring L (no shape) gives visibly different patches."""
    img = cv2.GaussianBlur(render_scene(320, 256, seed=5).astype(np.float32) / 255, (0, 0), 1.5)
    phi, t = np.deg2rad(30.0), 1.6
    rot = np.array([[np.cos(phi), -np.sin(phi)], [np.sin(phi), np.cos(phi)]])
    lin = rot @ np.diag([t, 1 / t]) @ rot.T
    off = np.array([160.0, 128.0]) - lin @ np.array([160.0, 128.0])  # about the centre
    warped = cv2.warpAffine(
        img,
        np.hstack([lin, off[:, None]]),
        (320, 256),
        flags=cv2.INTER_CUBIC,
        borderMode=cv2.BORDER_REFLECT,
    )
    kps = SiftDetector(max_keypoints=300)(img)
    xy = kps.xy @ lin.T + off
    keep = (
        (kps.size > 2.5)
        & (kps.size < 6)
        & (xy.min(1) > 50)
        & (xy[:, 0] < 270)
        & (xy[:, 1] < 206)
        & (kps.xy.min(1) > 50)
        & (kps.xy[:, 0] < 270)
        & (kps.xy[:, 1] < 206)
    )
    assert keep.sum() >= 20
    xy0, size, angle = kps.xy[keep], kps.size[keep], kps.angle[keep]
    p0 = extract_patches(img, xy0, size, angle)
    eye = np.repeat(np.eye(2, dtype=np.float32)[None], len(size), 0)
    assert torch.allclose(extract_patches(img, xy0, size, angle, shape=eye), p0, atol=1e-5)
    shp = np.repeat(lin[None].astype(np.float32), len(size), 0)
    p1 = extract_patches(warped, xy[keep], size, angle, shape=shp)
    p2 = extract_patches(warped, xy[keep], size, angle)
    err, control = (p1 - p0).abs().mean().item(), (p2 - p0).abs().mean().item()
    assert err < 0.01 and control > 10 * err, (err, control)
