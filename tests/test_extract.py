"""The extract stage and describers: SIFT/RootSIFT, --resize-max coordinates, upright,
keypoint budget, unreadable images, and learned nets with and without weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import SMALL_KEYPOINTS, write_scenes

from descmatch.describe import (
    NetDescriber,
    SiftDescriber,
    build_describer,
    method_choices,
    resolve_method,
)
from descmatch.detect import Keypoints, SiftDetector, to_uint8
from descmatch.errors import ConfigError, ImageReadError, WeightsError
from descmatch.extract import extract
from descmatch.h5 import Reader, read_features
from descmatch.images import list_images, read_image, resize_max
from descmatch.nets import NETS
from descmatch.weights import default_method, load_net, sha256

pytestmark = pytest.mark.usefixtures("no_weights")


def run_extract(
    folder: Path,
    out: Path,
    describer: object = None,
    max_keypoints: int = SMALL_KEYPOINTS,
    **kw: object,
) -> object:
    return extract(
        list_images(folder),
        out,
        describer if describer is not None else build_describer("rootsift"),
        SiftDetector(max_keypoints=max_keypoints),
        **kw,
    )  # type: ignore[arg-type]


def _blobs(h: int, w: int, centres: list[tuple[float, float]], sigma: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 0.2, np.float32)
    for cx, cy in centres:
        img += 0.6 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return img


# -- classical descriptors -------------------------------------------------------------------
def test_rootsift_is_unit_norm_non_negative_and_the_root_of_l1_sift(
    scene_dir: Path, tmp_path: Path
) -> None:
    run_extract(scene_dir, tmp_path / "root.h5", build_describer("rootsift"))
    run_extract(scene_dir, tmp_path / "sift.h5", build_describer("sift"))
    for name in ("img0.png", "img2.png"):
        root = read_features(tmp_path / "root.h5", name)
        sift = read_features(tmp_path / "sift.h5", name)
        np.testing.assert_array_equal(root["keypoints"], sift["keypoints"])
        r, s = root["descriptors"].T, sift["descriptors"].T  # (N,128)
        assert r.shape[1] == 128 and r.shape[0] > 50
        assert (r >= 0).all() and (s >= 0).all()
        np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-5)
        # RootSIFT = sqrt(L1-normalised SIFT).
        l1 = s / s.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(r, np.sqrt(l1), atol=1e-5)
        assert np.abs(r - s).max() > 0.05  # they are different descriptors


def test_descriptor_columns_follow_keypoint_order(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    run_extract(scene_dir, out, build_describer("sift"))
    f = read_features(out, "img1.png")
    img = read_image(scene_dir / "img1.png")
    det = SiftDetector(max_keypoints=SMALL_KEYPOINTS)
    kps = det(img)
    np.testing.assert_array_equal(f["keypoints"], kps.xy)
    # OpenCV's own SIFT on the stored keypoints gives the stored columns.
    cv_kps = [
        cv2.KeyPoint(float(x), float(y), float(s), float(a), float(r), k.octave)
        for (x, y), s, a, r, k in zip(
            f["keypoints"], f["scales"], f["oris"], f["scores"], kps.cv, strict=True
        )
    ]
    _, ref = det.make_cv().compute(to_uint8(img), cv_kps)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(f["descriptors"].T, ref, atol=1e-5)


def test_sift_describer_needs_opencv_keypoints(scene: np.ndarray) -> None:
    img = scene.astype(np.float32) / 255
    kps = SiftDetector(max_keypoints=10)(img)
    bare = Keypoints(kps.xy, kps.size, kps.angle, kps.response, None)
    with pytest.raises(ValueError):
        SiftDescriber()(img, bare)
    assert SiftDescriber()(img, Keypoints.empty()).shape == (0, 128)


@pytest.mark.parametrize("conf", [{"n_octave_layers": 5}, {"sigma": 2.0}, {"n_octave_layers": 6}])
def test_sift_descriptor_uses_the_detector_settings(scene: np.ndarray, conf: dict) -> None:
    img = scene.astype(np.float32) / 255
    det = SiftDetector(max_keypoints=200, **conf)
    kps = det(img)
    ours = SiftDescriber()(img, kps)
    _, ref = det.make_cv().compute(to_uint8(img), list(kps.cv))
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, ref, atol=1e-4)


# -- keypoints -------------------------------------------------------------------------------
def test_keypoint_budget_keeps_the_strongest(scene: np.ndarray) -> None:
    img = scene.astype(np.float32) / 255
    every = SiftDetector(max_keypoints=0)(img)
    some = SiftDetector(max_keypoints=100)(img)
    assert len(every) > 300 and len(some) == 100
    assert (np.diff(every.response) <= 0).all()
    np.testing.assert_array_equal(some.xy, every.xy[:100])
    np.testing.assert_array_equal(some.response, every.response[:100])


def test_upright_gives_angle_zero_and_one_keypoint_per_location(
    scene_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "up.h5"
    extract(
        list_images(scene_dir),
        out,
        build_describer("rootsift"),
        SiftDetector(max_keypoints=SMALL_KEYPOINTS, upright=True),
    )
    with Reader(out, "features") as r:
        assert json.loads(r.attrs["settings"])["upright"] is True
        for key in r.keys:
            f = r.read(key)
            assert len(f["oris"]) > 50
            assert (f["oris"] == 0).all()
            locs = np.round(np.c_[f["keypoints"], f["scales"]] * 100)
            assert len(np.unique(locs, axis=0)) == len(locs)
            np.testing.assert_allclose(np.linalg.norm(f["descriptors"], axis=0), 1.0, atol=1e-5)
    img = read_image(scene_dir / "img0.png")
    oriented = SiftDetector(max_keypoints=0)(img)
    upright = SiftDetector(max_keypoints=0, upright=True)(img)
    assert len(upright) < len(oriented)  # several orientations of a point became one
    assert len(np.unique(np.round(oriented.xy * 100), axis=0)) == len(
        np.unique(np.round(upright.xy * 100), axis=0)
    )


# -- --resize-max ----------------------------------------------------------------------------
def test_resize_max_stores_original_coordinates(example_dir: Path, tmp_path: Path) -> None:
    names = ["view1.jpg"]
    full, small = tmp_path / "full.h5", tmp_path / "small.h5"
    imgs = list_images(example_dir / "view1.jpg")
    assert imgs.names == names
    extract(imgs, full, build_describer("rootsift"), SiftDetector(max_keypoints=2000))
    extract(imgs, small, build_describer("rootsift"), SiftDetector(max_keypoints=300), max_side=320)
    a, b = read_features(full, "view1.jpg"), read_features(small, "view1.jpg")
    assert a["image_size"].tolist() == [640, 480] and b["image_size"].tolist() == [640, 480]
    with Reader(small, "features") as r:
        assert json.loads(r.attrs["settings"])["resize_max"] == 320
    xy = b["keypoints"]
    assert xy[:, 0].max() > 500 and xy[:, 1].max() > 380  # spans the original image
    assert xy[:, 0].min() > -1 and xy[:, 0].max() < 640 and xy[:, 1].max() < 480
    strong = slice(0, 100)
    d = np.linalg.norm(xy[strong, None] - a["keypoints"][None], axis=2)
    nearest = d.argmin(axis=1)
    close = d.min(axis=1) < 2.0
    assert close.mean() > 0.8
    # Sizes are in original pixels too: about those of the same points at full resolution.
    ratio = b["scales"][strong][close] / a["scales"][nearest[close]]
    assert 0.8 < np.median(ratio) < 1.25


def test_resize_coordinate_mapping_follows_the_pixel_centre_convention() -> None:
    centres = [(100.0, 80.0), (300.0, 120.0), (200.0, 300.0)]
    img = _blobs(400, 400, centres, sigma=8.0)
    small, (sx, sy) = resize_max(img, 100)  # s = 0.25
    # Locate each blob in the small image by its intensity centroid (exact for area
    # averaging of a symmetric blob), then map back the way extract does.
    found = []
    for cx, cy in centres:
        x0, y0 = round(cx * sx), round(cy * sy)
        win = small[y0 - 6 : y0 + 7, x0 - 6 : x0 + 7] - 0.2
        yy, xx = np.mgrid[y0 - 6 : y0 + 7, x0 - 6 : x0 + 7]
        found.append(((win * xx).sum() / win.sum(), (win * yy).sum() / win.sum()))
    z = np.zeros(3, np.float32)
    kps = Keypoints(np.array(found, np.float32), z + 4, z, z)
    back = kps.scaled(1.0 / sx, 1.0 / sy).xy
    np.testing.assert_allclose(back, np.array(centres), atol=0.25)


def test_detector_locates_a_blob_at_its_centre() -> None:
    centres = [(150.0, 140.0), (60.0, 70.0)]
    img = _blobs(300, 300, centres, sigma=5.0)
    kps = SiftDetector(max_keypoints=10)(img)
    for c in centres:
        d = np.linalg.norm(kps.xy - np.array(c), axis=1)
        assert d.min() < 0.1, (c, kps.xy[d.argmin()])


# -- unreadable images -----------------------------------------------------------------------
def test_unreadable_images_are_skipped_and_listed(scene_dir: Path, tmp_path: Path) -> None:
    (scene_dir / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "f.h5"
    res = run_extract(scene_dir, out)
    assert res.images == 3  # type: ignore[attr-defined]
    assert [n for n, _ in res.failed] == ["broken.jpg"]  # type: ignore[attr-defined]
    assert "broken.jpg" in res.failed[0][1]  # type: ignore[attr-defined]
    with Reader(out, "features") as r:
        assert "broken.jpg" not in r.keys and len(r.keys) == 3


def test_strict_makes_an_unreadable_image_fatal_but_keeps_finished_work(
    scene_dir: Path, tmp_path: Path
) -> None:
    (scene_dir / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "f.h5"
    with pytest.raises(ImageReadError, match="img1.png"):
        run_extract(scene_dir, out, strict=True)
    with Reader(out, "features") as r:
        assert r.keys == ["img0.png"]


# -- learned nets ----------------------------------------------------------------------------
def test_auto_is_rootsift_without_shipped_weights() -> None:
    assert default_method() is None
    assert resolve_method("auto") == "rootsift"
    assert build_describer("auto").name == "rootsift"
    assert set(method_choices()) == {"auto", "sift", "rootsift", *NETS}
    with pytest.raises(ConfigError, match="surf"):
        resolve_method("surf")


@pytest.mark.parametrize("method", sorted(NETS))
def test_learned_net_without_weights_says_how_to_get_them(method: str) -> None:
    with pytest.raises(WeightsError) as e:
        build_describer(method)
    msg = str(e.value)
    assert "descmatch train" in msg and "--weights" in msg and method in msg


def test_checkpoint_loads_and_extracts(hardnet_ckpt: Path, scene_dir: Path, tmp_path: Path) -> None:
    loaded = load_net("hardnet", hardnet_ckpt)
    assert not loaded.net.training and loaded.meta == {"data": "test", "steps": 0}
    describer = build_describer("hardnet", weights=str(hardnet_ckpt), precision="fp32")
    assert isinstance(describer, NetDescriber)
    assert describer.dim == 128
    out = tmp_path / "f.h5"
    res = run_extract(scene_dir, out, describer, max_keypoints=150)
    assert res.images == 3  # type: ignore[attr-defined]
    with Reader(out, "features") as r:
        assert r.attrs["method"] == "hardnet" and int(r.attrs["descriptor_dim"]) == 128
        assert r.attrs["weights"] == "my-hardnet.pt"
        assert r.attrs["weights_sha256"] == sha256(hardnet_ckpt)
        assert json.loads(r.attrs["settings"])["mr_size"] == describer.mr_size
        for key in r.keys:
            d = r.read(key)["descriptors"]
            assert d.shape == (128, 150) and d.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-4)
            assert np.isfinite(d).all()
    # The stored descriptors are the net's output on the patches, summed over the default
    # size pooling's factors and normalised.
    img = read_image(scene_dir / "img0.png")
    kps = SiftDetector(max_keypoints=150)(img)
    with torch.inference_mode():
        ref = loaded.net(describer.patches(img, kps)).numpy()
    ref = ref.reshape(len(describer.size_pool), len(kps), -1).sum(0)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(read_features(out, "img0.png")["descriptors"].T, ref, atol=1e-4)


@pytest.mark.parametrize("pack", [0, 200, 10**6])
def test_images_packed_into_one_net_call_give_the_same_file(
    hardnet_ckpt: Path, scene_dir: Path, tmp_path: Path, pack: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CUDA path gathers images until a batch is full; forced here on the CPU: 0 (one net
    # pass per image), 200 (two images of 150 keypoints per pass), everything in one pass.
    describer = build_describer("hardnet", weights=str(hardnet_ckpt), precision="fp32")
    assert describer.pack_patches == 0  # the CPU default  # type: ignore[attr-defined]
    ref = tmp_path / "ref.h5"
    run_extract(scene_dir, ref, describer, max_keypoints=150)
    monkeypatch.setattr(NetDescriber, "pack_patches", pack)
    passes: list[int] = []
    real = NetDescriber.describe_patches
    monkeypatch.setattr(
        NetDescriber, "describe_patches", lambda self, p: passes.append(len(p)) or real(self, p)
    )
    seen: list[tuple[int, int, str]] = []
    out = tmp_path / "packed.h5"
    res = run_extract(
        scene_dir,
        out,
        describer,
        max_keypoints=150,
        progress=lambda i, n, name: seen.append((i, n, name)),
    )
    f = len(describer.size_pool)  # patches per keypoint (size pooling)
    assert passes == [f * n for n in {0: [150, 150, 150], 200: [300, 150], 10**6: [450]}[pack]]
    assert res.images == 3 and [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    for key in ("img0.png", "img1.png", "img2.png"):
        a, b = read_features(ref, key), read_features(out, key)
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
        np.testing.assert_allclose(a["descriptors"], b["descriptors"], atol=1e-5)


def test_checkpoint_mr_size_is_used(ckpt_dir: Path) -> None:
    ckpt = ckpt_dir / "sos.pt"
    assert build_describer("sosnet", weights=str(ckpt)).mr_size == 7.5
    assert build_describer("sosnet", weights=str(ckpt), mr_size=4.0).mr_size == 4.0


def test_central_surround_checkpoint_extracts(ckpt_dir: Path, scene_dir: Path) -> None:
    ckpt = ckpt_dir / "cs.pt"
    describer = build_describer("l2net-cs", weights=str(ckpt))
    assert describer.dim == 256
    img = read_image(scene_dir / "img0.png")
    kps = SiftDetector(max_keypoints=40)(img)
    f = len(describer.size_pool)  # type: ignore[attr-defined]
    assert describer.patches(img, kps).shape == (f * 40, 1, 64, 64)  # type: ignore[attr-defined]
    d = describer(img, kps)
    assert d.shape == (40, 256)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-4)


def test_weights_of_another_net_are_refused(ckpt_dir: Path) -> None:
    ckpt = ckpt_dir / "sos.pt"
    with pytest.raises(WeightsError) as e:
        build_describer("hardnet", weights=str(ckpt))
    assert str(ckpt) in str(e.value) and "sosnet" in str(e.value)


def test_bare_state_dict_that_does_not_fit_is_refused(tmp_path: Path, hardnet_ckpt: Path) -> None:
    state = torch.load(hardnet_ckpt, weights_only=True)["state_dict"]
    p = tmp_path / "bare.pt"
    narrow = {
        k: v[:64] if k.startswith("tower.head") and v.ndim else v for k, v in state.items()
    }  # a 64-D head
    torch.save(narrow, p)
    with pytest.raises(WeightsError) as e:
        load_net("hardnet", p)
    assert str(p) in str(e.value) and "does not fit" in str(e.value)
    good = tmp_path / "bare-ok.pt"
    torch.save({"state_dict": state}, good)
    assert load_net("hardnet", good).net.dim == 128  # HardNet's own file layout


@pytest.mark.parametrize("content", [b"", b"not a torch file at all", b"PK\x03\x04broken zip"])
def test_corrupt_weights_file_is_refused(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "corrupt.pt"
    p.write_bytes(content)
    with pytest.raises(WeightsError) as e:
        build_describer("hardnet", weights=str(p))
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="missing.pt"):
        build_describer("hardnet", weights=str(tmp_path / "missing.pt"))


def test_weights_do_not_apply_to_classical_methods(hardnet_ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="--weights"):
        build_describer("rootsift", weights=str(hardnet_ckpt))


def test_shipped_default_weights_are_found(no_weights: Path, hardnet_ckpt: Path) -> None:
    shutil.copyfile(hardnet_ckpt, no_weights / "hardnet.pt")
    try:
        assert default_method() is None  # no DEFAULT file yet
        (no_weights / "DEFAULT").write_text("hardnet\n")
        assert default_method() == "hardnet"
        assert resolve_method("auto") == "hardnet"
        describer = build_describer("auto")
        assert describer.name == "hardnet"
        assert describer.meta["weights"] == "hardnet.pt"
        assert build_describer("hardnet", weights="hardnet").name == "hardnet"  # by name
    finally:
        for p in no_weights.iterdir():
            p.unlink()


def test_extract_a_few_images_quickly(tmp_path: Path) -> None:
    """Many small images: everything is processed once, in name order."""
    folder = tmp_path / "many"
    write_scenes(folder, 8, width=128, height=96)
    seen: list[tuple[int, int, str]] = []
    res = run_extract(
        folder,
        tmp_path / "f.h5",
        max_keypoints=50,
        progress=lambda i, n, name: seen.append((i, n, name)),
    )
    assert res.images == 8  # type: ignore[attr-defined]
    assert seen == [(i + 1, 8, f"img{i}.png") for i in range(8)]


def test_reduced_precision_stays_close_to_fp32(hardnet_ckpt: Path) -> None:
    """bf16 (where the CPU has it) gives unit descriptors within rounding of the fp32 ones."""
    from descmatch.examples import render_scene

    img = render_scene(320, 240, seed=3).astype(np.float32) / 255.0
    kps = SiftDetector(max_keypoints=200)(img)
    ref = build_describer("hardnet", weights=str(hardnet_ckpt), precision="fp32")(img, kps)
    low = build_describer("hardnet", weights=str(hardnet_ckpt), precision="bf16")(img, kps)
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, atol=1e-5)
    cos = (ref * low).sum(1)
    assert cos.min() > 0.98 and cos.mean() > 0.995


def test_sequential_and_pipelined_extract_write_the_same_and_time_each_stage(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "imgs"
    write_scenes(folder, 4, width=128, height=96)
    a = run_extract(folder, tmp_path / "a.h5", max_keypoints=50)
    b = run_extract(folder, tmp_path / "b.h5", max_keypoints=50, prefetch=0)
    for res in (a, b):
        assert res.images == 4  # type: ignore[attr-defined]
        assert res.load_seconds > 0 and res.describe_seconds > 0  # type: ignore[attr-defined]
        assert res.write_seconds > 0  # type: ignore[attr-defined]
    with Reader(tmp_path / "a.h5", "features") as ra, Reader(tmp_path / "b.h5", "features") as rb:
        assert sorted(ra.keys) == sorted(rb.keys)
        for k in ra.keys:
            np.testing.assert_array_equal(ra.read(k)["descriptors"], rb.read(k)["descriptors"])
