"""descmatch inside kornia: keypoints to and from LAFs (the same windows as descmatch's own
patches), nets as kornia patch descriptors, and a kornia LocalFeature end to end."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from descmatch.detect import Keypoints
from descmatch.errors import InputError
from descmatch.examples import render_scene
from descmatch.kornia_interop import (
    KorniaDetector,
    LAFDescriptor,
    PatchDescriptor,
    keypoints_from_lafs,
    lafs_from_keypoints,
)
from descmatch.nets import build_net
from descmatch.patches import extract_patches
from descmatch.weights import save_checkpoint

KF = pytest.importorskip("kornia.feature")

pytestmark = pytest.mark.usefixtures("one_thread")


def _keypoints(n: int, seed: int = 0) -> Keypoints:
    rng = np.random.default_rng(seed)
    return Keypoints(
        rng.uniform(70, 170, (n, 2)).astype(np.float32),
        rng.uniform(2.5, 8.0, n).astype(np.float32),
        rng.uniform(0, 360, n).astype(np.float32),
        rng.uniform(0, 1, n).astype(np.float32),
    )


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_laf_round_trip_and_same_windows() -> None:
    kps = _keypoints(60)
    lafs = lafs_from_keypoints(kps, mr_size=10.0)
    assert lafs.shape == (1, 60, 2, 3)
    back = keypoints_from_lafs(lafs, torch.as_tensor(kps.response)[None], mr_size=10.0)
    np.testing.assert_allclose(back.xy, kps.xy, atol=1e-5)
    np.testing.assert_allclose(back.size, kps.size, rtol=1e-5)
    turn = (back.angle - kps.angle + 180) % 360 - 180
    np.testing.assert_allclose(turn, 0, atol=1e-3)
    np.testing.assert_array_equal(back.response, kps.response)

    # kornia's patches of the LAFs are descmatch's patches of the keypoints (centre, window,
    # turn; they differ only in how each smooths before sampling).
    img = render_scene(256, 256, seed=4).astype(np.float32) / 255
    ours = extract_patches(img, kps.xy, kps.size, kps.angle, mr_size=10.0)
    theirs = KF.extract_patches_from_pyramid(torch.from_numpy(img)[None, None], lafs, 32)[0]
    c = _corr(ours, theirs)
    assert c.mean() > 0.98 and c.min() > 0.9
    # The angle's sign matters: the mirrored turn gives other patches.
    flipped = Keypoints(kps.xy, kps.size, -kps.angle, kps.response)
    wrong = KF.extract_patches_from_pyramid(
        torch.from_numpy(img)[None, None], lafs_from_keypoints(flipped), 32
    )[0]
    assert _corr(ours, wrong).mean() < 0.5

    with pytest.raises(InputError, match=r"\(1,N,2,3\)"):
        keypoints_from_lafs(torch.zeros(2, 3, 2, 3))


def test_patch_descriptor_is_a_kornia_style_module(ckpt_dir: Path) -> None:
    desc = PatchDescriptor.load("sosnet", ckpt_dir / "sos.pt")
    x = torch.rand(5, 1, 32, 32)
    with torch.inference_mode():
        d = desc(x)
    assert d.shape == (5, 128) and not desc.training
    torch.testing.assert_close(d.norm(dim=1), torch.ones(5))
    with pytest.raises(InputError, match=r"\(B,1,32,32\)"):
        desc(torch.rand(5, 1, 64, 64))
    # kornia's own LAFDescriptor takes it as it takes kornia.feature.HardNet.
    img = torch.rand(1, 1, 96, 96)
    lafs = lafs_from_keypoints(
        Keypoints(
            np.array([[48.0, 48.0]], np.float32), *[np.ones(1, np.float32) * v for v in (4, 0, 1)]
        )
    )
    with torch.inference_mode():
        out = KF.LAFDescriptor(desc, patch_size=32)(img, lafs)
    assert out.shape == (1, 1, 128)


def test_central_surround_nets_see_twice_the_window(tmp_path: Path) -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "cs.pt", build_net("sosnet-cs"), meta={})
    desc = LAFDescriptor("sosnet-cs", tmp_path / "cs.pt")
    img = render_scene(160, 160, seed=2).astype(np.float32) / 255
    kps = _keypoints(6)
    kps.xy[:] = 80.0
    with torch.inference_mode():
        got = desc(torch.from_numpy(img)[None, None], lafs_from_keypoints(kps))
        net = desc.patch_descriptor.net
        patches = KF.extract_patches_from_pyramid(
            torch.from_numpy(img)[None, None], lafs_from_keypoints(kps, window_factor=2.0), 64
        )[0]
        expect = net(patches)
    assert got.shape == (1, 6, 256)
    torch.testing.assert_close(got[0], expect)


def test_kornia_local_feature_end_to_end(ckpt_dir: Path) -> None:
    """kornia.feature.LocalFeature with descmatch's detector and a descmatch net, then
    kornia's matcher, on a rendered image and its homography-warped copy."""
    img0 = render_scene(320, 240, seed=3).astype(np.float32) / 255
    h = np.array([[0.9, 0.15, 20.0], [-0.1, 0.95, 15.0], [2e-4, 1e-4, 1.0]])
    img1 = cv2.warpPerspective(img0, h, (320, 240))
    feature = KF.LocalFeature(
        KorniaDetector(max_keypoints=200), LAFDescriptor("sosnet", ckpt_dir / "sos.pt")
    )
    with torch.inference_mode():
        l0, r0, d0 = feature(torch.from_numpy(img0)[None, None])
        l1, r1, d1 = feature(torch.from_numpy(img1)[None, None])
    assert l0.shape == (1, 200, 2, 3) and r0.shape == (1, 200) and d0.shape == (1, 200, 128)
    _, idx = KF.match_smnn(d0[0], d1[0], 0.9)
    c0 = KF.get_laf_center(l0)[0][idx[:, 0]].numpy().astype(np.float64)
    c1 = KF.get_laf_center(l1)[0][idx[:, 1]].numpy()
    err = np.linalg.norm(cv2.perspectiveTransform(c0[None], h)[0] - c1, axis=1)
    assert len(idx) > 60 and (err < 3).mean() > 0.9
    # The detector's LAFs are descmatch keypoints again.
    kps = keypoints_from_lafs(l0, r0)
    assert len(kps) == 200 and (kps.size > 0).all()
