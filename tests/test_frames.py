"""The keypoint frame refiner: its loss against hand-computed values, the net's bounds, the
describer and extract paths that use it, and ``descmatch train --method frames`` end to end
(pools, logs, exact --resume, errors)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import MainResult

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import ConfigError
from descmatch.h5 import Reader
from descmatch.images import read_image
from descmatch.nets import FrameNet, build_net
from descmatch.train.frames import frame_losses
from descmatch.weights import load_net, save_checkpoint, sha256


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _losses(a1: float, a2: float, jac: np.ndarray, s1: float = 1.0, s2: float = 1.0,
            th1: float = 0.0, th2: float = 0.0, r1: float = 0.0, r2: float = 0.0
            ) -> tuple[float, float]:
    lo, ls = frame_losses(_t(th1), _t(r1), _t(th2), _t(r2), _t(a1), _t(s1), _t(a2), _t(s2),
                          torch.tensor(jac[None], dtype=torch.float64))
    return float(lo[0]), float(ls[0])


def test_frame_losses_match_hand_computed_values() -> None:
    eye = np.eye(2)
    assert _losses(30.0, 30.0, eye) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert _losses(30.0, 90.0, eye)[0] == pytest.approx(0.5)  # 1 - cos 60
    # A similarity: rotation by 90 degrees (y down: +x -> +y) and scale 2. A gradient
    # direction turns with it; the size doubles.
    sim = 2.0 * np.array([[0.0, -1.0], [1.0, 0.0]])
    assert _losses(0.0, 90.0, sim, 1.0, 2.0) == pytest.approx((0.0, 0.0), abs=1e-12)
    assert _losses(0.0, 0.0, sim, 1.0, 1.0) == pytest.approx((1.0, math.log(2.0) ** 2))
    # Refinements that move both frames consistently cost nothing.
    assert _losses(0.0, 90.0, sim, 1.0, 2.0, th1=0.3, th2=0.3, r1=0.2, r2=0.2) == \
        pytest.approx((0.0, 0.0), abs=1e-12)
    # ... and one that fixes the detector's error removes it: the warp keypoint 20 degrees
    # and 1.5x off.
    lo, ls = _losses(0.0, 110.0, sim, 1.0, 3.0, th2=-math.radians(20), r2=-math.log(1.5))
    assert (lo, ls) == pytest.approx((0.0, 0.0), abs=1e-12)
    # A stretch along x by 2: a gradient maps by J^-T = diag(1/2, 1), so 45 degrees turns to
    # atan2(sin 45, cos 45 / 2) = 63.43 degrees; the size grows by sqrt(2).
    st = np.diag([2.0, 1.0])
    expect = math.degrees(math.atan2(math.sin(math.pi / 4), math.cos(math.pi / 4) / 2))
    lo, ls = _losses(45.0, expect, st, 1.0, math.sqrt(2.0))
    assert (lo, ls) == pytest.approx((0.0, 0.0), abs=1e-12)
    lo, _ = _losses(45.0, 45.0, st, 1.0, math.sqrt(2.0))
    assert lo == pytest.approx(1.0 - math.cos(math.radians(expect - 45.0)))
    # A mirror (det < 0) maps the direction with the opposite sense of the adjugate.
    mirror = np.diag([-1.0, 1.0])
    assert _losses(0.0, 180.0, mirror) == pytest.approx((0.0, 0.0), abs=1e-12)


def test_untrained_frame_net_keeps_frames_and_outputs_are_bounded() -> None:
    net = FrameNet().eval()
    x = torch.rand(5, 1, 32, 32)
    theta, rho = net(x)
    assert torch.all(theta == 0) and torch.all(rho == 0)
    torch.nn.init.constant_(net.head.bias, 50.0)
    theta, rho = net(x)
    assert torch.all(theta == 0)  # scale-only by default
    torch.testing.assert_close(rho, torch.full((5,), math.log(1.8)))
    rot = FrameNet({"rotation": True, "max_rotation": 30.0}).eval()
    torch.nn.init.constant_(rot.head.bias, -50.0)
    theta, rho = rot(x)
    torch.testing.assert_close(theta, torch.full((5,), -math.radians(30.0)))
    torch.testing.assert_close(rho, torch.full((5,), -math.log(1.8)))
    with pytest.raises(ConfigError, match="unknown config key"):
        FrameNet({"depth": 3})
    with pytest.raises(ConfigError, match="max_scale > 1"):
        FrameNet({"max_scale": 0.5})


def _scaling_frames(path: Path, log_scale: float) -> Path:
    """A frames checkpoint whose net rescales every keypoint by exp(log_scale)."""
    net = FrameNet({"max_scale": 2.0})
    torch.nn.init.constant_(net.head.bias, math.atanh(log_scale / math.log(2.0)))
    return save_checkpoint(path, net, {"data": "test"})


def test_describer_describes_in_the_refined_frames(tmp_path: Path, scene_dir: Path,
                                                   ckpt_dir: Path) -> None:
    frames = _scaling_frames(tmp_path / "f.pt", math.log(1.25))
    assert isinstance(load_net("frames", frames).net, FrameNet)
    net_ckpt = str(ckpt_dir / "sos.pt")
    plain = build_describer("sosnet", net_ckpt, precision="fp32", frames="none")
    refined = build_describer("sosnet", net_ckpt, precision="fp32", frames=str(frames))
    assert refined.meta["frames_sha256"] == sha256(frames)
    assert "frames_sha256" not in plain.meta
    img = read_image(scene_dir / "img0.png")
    kps = SiftDetector(max_keypoints=60)(img)
    out = refined.refine(img, kps)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(out.xy, kps.xy)
    np.testing.assert_array_equal(out.angle, kps.angle)
    np.testing.assert_allclose(out.size, kps.size * 1.25, rtol=1e-5)
    want = plain(img, replace(kps, size=kps.size * np.float32(1.25), cv=None))
    np.testing.assert_allclose(refined(img, kps), want, atol=1e-4)
    assert not np.allclose(plain(img, kps), want, atol=1e-2)
    # An untrained refiner changes nothing.
    zero = save_checkpoint(tmp_path / "zero.pt", FrameNet(), {})
    same = build_describer("sosnet", net_ckpt, precision="fp32", frames=str(zero))
    np.testing.assert_allclose(same(img, kps), plain(img, kps), atol=1e-5)
    with pytest.raises(ConfigError, match="--frames does not apply"):
        build_describer("rootsift", frames=str(frames))


def test_extract_writes_the_refined_frames(tmp_path: Path, scene_dir: Path, ckpt_dir: Path,
                                           call_main: Callable[..., MainResult]) -> None:
    frames = _scaling_frames(tmp_path / "f.pt", math.log(0.8))
    out = tmp_path / "feats.h5"
    base = ["extract", str(scene_dir), "--method", "sosnet", "--weights",
            str(ckpt_dir / "sos.pt"), "--max-keypoints", "50", "--precision", "fp32"]
    assert call_main(*base, str(out), "--frames", str(frames))[0] == 0
    assert call_main(*base, str(tmp_path / "plain.h5"), "--frames", "none")[0] == 0
    with Reader(out, "features") as r, Reader(tmp_path / "plain.h5", "features") as p:
        assert json.loads(r.attrs["settings"])["frames_sha256"] == sha256(frames)
        assert "frames_sha256" not in json.loads(p.attrs["settings"])
        a, b = r.read("img0.png"), p.read("img0.png")
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
        np.testing.assert_allclose(a["scales"], b["scales"] * 0.8, rtol=1e-5)
        assert not np.allclose(a["descriptors"], b["descriptors"], atol=1e-2)
    # Resuming the file with other frames is refused, and the file is left as it was.
    before = out.read_bytes()
    code, _, err = call_main(*base, str(out), "--frames", "none")
    assert code != 0 and "settings" in err
    assert out.read_bytes() == before


def _photos(d: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(3)
    d.mkdir(parents=True)
    for i in range(n):
        noise = cv2.GaussianBlur(rng.random((200, 260)).astype(np.float32), (0, 0), 2.5)
        img = np.clip((noise - noise.mean()) * 900 + 128, 0, 255).astype(np.uint8)
        cv2.imwrite(str(d / f"p{i}.png"), img)
    return d


def test_train_frames_end_to_end_and_resume_exactly(
        tmp_path: Path, call_main: Callable[..., MainResult]) -> None:
    photos = _photos(tmp_path / "ph")
    args = ["train", "--method", "frames", "--data", f"photos:{photos}", "--steps", "6",
            "--batch-size", "32", "--eval-every", "3", "--checkpoint-every", "3",
            "--max-tilt", "3", "--pair-angle", "75", "--pair-scale", "1.8",
            "--pairs-per-image", "60", "--seed", "1"]
    whole = tmp_path / "whole"
    assert call_main(*args, "--out", str(whole))[0] == 0
    ck = torch.load(whole / "frames.pt", weights_only=True)
    assert ck["method"] == "frames" and ck["meta"]["steps"] == 6
    assert "detector" in ck["meta"]["headline"]
    log = json.loads((whole / "train_log.json").read_text())
    assert [r["step"] for r in log] == [3, 6]
    for key in ("detector_off", "refined_off", "angle_loss", "scale_loss"):
        assert all(math.isfinite(r[key]) for r in log)
    assert (whole / "train_log.csv").read_text().startswith("step,")
    assert len(list((whole / "pools").glob("*.npz"))) == 2
    # Interrupted after the first step (--time-limit 0), then resumed: the same weights.
    part = tmp_path / "part"
    assert call_main(*args, "--out", str(part), "--time-limit", "0")[0] == 0
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 1
    code, _, err = call_main(*args, "--out", str(part))
    assert code != 0 and "--resume" in err
    assert call_main(*args, "--out", str(part), "--resume")[0] == 0
    a = torch.load(part / "frames.pt", weights_only=True)["state_dict"]
    for k, v in ck["state_dict"].items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=0)


def test_train_frames_refuses_other_sources(tmp_path: Path,
                                            call_main: Callable[..., MainResult]) -> None:
    code, _, err = call_main("train", "--method", "frames", "--data", f"multiview:{tmp_path}",
                             "--out", str(tmp_path / "r"))
    assert code != 0 and "photos: sources only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_frames_is_a_registered_model() -> None:
    assert isinstance(build_net("frames"), FrameNet)


def test_training_pairs_are_cut_in_the_refined_frames(tmp_path: Path) -> None:
    from descmatch.patches import build_pyramid, extract_patches
    from descmatch.train.photos import PhotoPairConfig, photo_pairs

    frames = load_net("frames", _scaling_frames(tmp_path / "f.pt", math.log(1.25))).net
    img = cv2.imread(str(_photos(tmp_path / "ph", 1) / "p0.png"), cv2.IMREAD_GRAYSCALE)
    img = img.astype(np.float32) / 255.0
    conf = PhotoPairConfig(pairing="mapped", photometric_source=False)
    plain = photo_pairs(img, np.random.default_rng(0), conf, max_pairs=40)
    refined = photo_pairs(img, np.random.default_rng(0), conf, max_pairs=40, frames=frames)
    assert len(plain) == len(refined) > 10
    np.testing.assert_array_equal(plain.src_xy, refined.src_xy)
    np.testing.assert_allclose(refined.src_size, plain.src_size * 1.25, rtol=1e-5)
    np.testing.assert_allclose(refined.dst_size, plain.dst_size * 1.25, rtol=1e-5)
    t = torch.from_numpy(img)
    want = extract_patches(t, refined.src_xy, refined.src_size, refined.src_angle,
                           pyramid=build_pyramid(t))
    got = torch.from_numpy(refined.patches[:, 0]).float() / 255.0
    torch.testing.assert_close(got, want[:, 0], atol=1 / 255 + 1e-6, rtol=0)


def test_descriptor_training_with_frames_records_them(
        tmp_path: Path, call_main: Callable[..., MainResult]) -> None:
    frames = _scaling_frames(tmp_path / "f.pt", math.log(1.25))
    photos = _photos(tmp_path / "ph", 2)
    out = tmp_path / "run"
    code, _, err = call_main("train", "--method", "hardnet", "--data", f"photos:{photos}",
                             "--out", str(out), "--steps", "2", "--batch-size", "16",
                             "--val", "none", "--frames", str(frames),
                             "--pairs-per-image", "64")
    assert code == 0, err
    ck = torch.load(out / "hardnet.pt", weights_only=True)
    assert ck["meta"]["frames_sha256"] == sha256(frames)
    (pool,) = (out / "pools").iterdir()
    assert json.loads((pool / "meta.json").read_text())["frames_sha256"] == sha256(frames)
    code, _, err = call_main("train", "--method", "frames", "--data", f"photos:{photos}",
                             "--out", str(tmp_path / "r2"), "--frames", str(frames))
    assert code != 0 and "--frames applies to descriptor nets" in err
