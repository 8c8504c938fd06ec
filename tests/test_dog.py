"""The torch DoG detector (the GPU path) finds OpenCV SIFT's keypoints: same positions, sizes,
angles and responses, on whatever device the image is on (the CPU here)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from descmatch.detect import Keypoints, SiftDetector, build_detector
from descmatch.dog import DoGDetector, _upsample2


def pairs_within(a: Keypoints, b: Keypoints, px: float) -> tuple[np.ndarray, np.ndarray]:
    """For each keypoint of a: whether b has one within px with the same size (2%) and angle
    (3 degrees), and the nearest's distance."""
    d = np.linalg.norm(a.xy[:, None] - b.xy[None], axis=2)
    ds = np.abs(b.size[None] / a.size[:, None] - 1)
    da = np.abs((a.angle[:, None] - b.angle[None] + 180) % 360 - 180)
    same = (d < px) & (ds < 0.02) & (da < 3)
    return same.any(1), d.min(1)


@pytest.fixture(scope="module")
def image(scene: np.ndarray) -> np.ndarray:
    return scene.astype(np.float32) / 255.0


def test_dog_matches_opencv_sift_keypoints(image: np.ndarray) -> None:
    cv = SiftDetector(max_keypoints=300)(image)
    ours = DoGDetector(max_keypoints=300)(image)
    assert len(cv) == 300 and len(ours) == 300
    found, dist = pairs_within(cv, ours, 0.5)
    assert found.mean() > 0.9, found.mean()
    back, _ = pairs_within(ours, cv, 0.5)
    assert back.mean() > 0.9, back.mean()
    close = dist < 0.05
    assert close.mean() > 0.8  # most positions agree to a twentieth of a pixel
    j = np.linalg.norm(cv.xy[:, None] - ours.xy[None], axis=2).argmin(1)
    np.testing.assert_allclose(ours.response[j][close], cv.response[close], rtol=0.02)


def test_strongest_first_budget_and_types(image: np.ndarray) -> None:
    k = DoGDetector(max_keypoints=50)(image)
    assert len(k) == 50 and np.all(np.diff(k.response) <= 0)
    assert k.xy.dtype == np.float32 and k.xy.shape == (50, 2) and k.cv is None
    assert np.all((k.angle >= 0) & (k.angle < 360))
    everything = DoGDetector(max_keypoints=0)(image)
    assert len(everything) > 300


def test_upright_one_keypoint_per_location_angle_zero(image: np.ndarray) -> None:
    k = DoGDetector(max_keypoints=0, upright=True)(image)
    assert np.all(k.angle == 0)
    assert len(np.unique(np.round(k.xy * 100), axis=0)) == len(k)
    oriented = DoGDetector(max_keypoints=0)(image)
    assert len(oriented) > len(k)  # some extrema have two orientations


def test_a_blob_is_found_at_its_subpixel_centre() -> None:
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float32)
    cx, cy, s = 60.3, 41.7, 4.0
    img = 0.2 + 0.6 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
    k = DoGDetector(max_keypoints=1)(img.astype(np.float32))
    cv = SiftDetector(max_keypoints=1)(img.astype(np.float32))
    assert np.linalg.norm(k.xy[0] - [cx, cy]) < 0.1
    np.testing.assert_allclose(k.size, cv.size, rtol=0.01)


def test_flat_and_tiny_images_have_no_keypoints() -> None:
    assert len(DoGDetector()(np.full((64, 64), 0.5, np.float32))) == 0
    assert len(DoGDetector()(np.zeros((8, 8), np.float32))) == 0
    with pytest.raises(ValueError, match=r"\(H,W\)"):
        DoGDetector()(np.zeros((4, 4, 3), np.float32))


def test_upsampling_puts_pixel_j_at_half_j() -> None:
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    import torch

    up = _upsample2(torch.from_numpy(img)).numpy()
    assert up.shape == (6, 8)
    np.testing.assert_allclose(up[::2, ::2], img)
    np.testing.assert_allclose(up[0, 1], 0.5)  # between (0,0) and (0,1)
    np.testing.assert_allclose(up[1, 0], 2.0)  # between (0,0) and (1,0)


def test_registry_builds_both_detectors() -> None:
    assert isinstance(build_detector("dog", max_keypoints=5), DoGDetector)
    assert isinstance(build_detector("sift"), SiftDetector)


def test_cli_extract_with_dog_detector(
    call_main: object, scene_dir: Path, tmp_path: Path, hardnet_ckpt: Path
) -> None:
    out = tmp_path / "f.h5"
    code, _, err = call_main(  # type: ignore[operator]
        "extract",
        str(scene_dir),
        str(out),
        "--method",
        "hardnet",
        "--weights",
        str(hardnet_ckpt),
        "--detector",
        "dog",
        "--device",
        "cpu",
        "--max-keypoints",
        "100",
    )
    assert code == 0, err
    with h5py.File(out, "r") as f:
        assert '"detector": "dog"' in f.attrs["settings"]
        assert f["img0.png"]["keypoints"].shape == (100, 2)
        assert f["img0.png"]["descriptors"].shape == (128, 100)
    # The same file cannot be completed with the other detector's keypoints.
    code, _, err = call_main(
        "extract",
        str(scene_dir),
        str(out),
        "--method",  # type: ignore
        "hardnet",
        "--weights",
        str(hardnet_ckpt),
        "--max-keypoints",
        "100",
    )
    assert code == 3 and "settings" in err


def test_cli_refuses_dog_with_a_classical_descriptor(
    call_main: object, scene_dir: Path, tmp_path: Path
) -> None:
    code, _, err = call_main(  # type: ignore[operator]
        "extract",
        str(scene_dir),
        str(tmp_path / "f.h5"),
        "--method",
        "rootsift",
        "--detector",
        "dog",
    )
    assert code == 2 and "--detector dog: rootsift needs OpenCV" in err
    assert not (tmp_path / "f.h5").exists()
