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
from descmatch.train.frames import CONTEXT, CONTEXT_PX, frame_losses, resample
from descmatch.weights import load_net, save_checkpoint, sha256


def _t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def _losses(
    a1: float,
    a2: float,
    jac: np.ndarray,
    s1: float = 1.0,
    s2: float = 1.0,
    th1: float = 0.0,
    th2: float = 0.0,
    r1: float = 0.0,
    r2: float = 0.0,
) -> tuple[float, float]:
    lo, ls = frame_losses(
        _t(th1),
        _t(r1),
        _t(th2),
        _t(r2),
        _t(a1),
        _t(s1),
        _t(a2),
        _t(s2),
        torch.tensor(jac[None], dtype=torch.float64),
    )
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
    assert _losses(0.0, 90.0, sim, 1.0, 2.0, th1=0.3, th2=0.3, r1=0.2, r2=0.2) == pytest.approx(
        (0.0, 0.0), abs=1e-12
    )
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


def test_describer_describes_in_the_refined_frames(
    tmp_path: Path, scene_dir: Path, ckpt_dir: Path
) -> None:
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


def test_a_turning_refiner_turns_frames_except_for_upright_keypoints(
    tmp_path: Path, scene_dir: Path, ckpt_dir: Path
) -> None:
    net = FrameNet({"rotation": True})
    torch.nn.init.constant_(net.head.bias, math.atanh(20.0 / 60.0))  # +20 degrees, 1.8**(1/3)
    frames = save_checkpoint(tmp_path / "turn.pt", net, {})
    img = read_image(scene_dir / "img0.png")
    kps = SiftDetector(max_keypoints=40)(img)
    ups = SiftDetector(max_keypoints=40, upright=True)(img)
    for upright, k in ((False, kps), (True, ups)):
        d = build_describer(
            "sosnet",
            str(ckpt_dir / "sos.pt"),
            precision="fp32",
            frames=str(frames),
            upright=upright,
        )
        out = d.refine(img, k)  # type: ignore[attr-defined]
        np.testing.assert_allclose(out.size, k.size * 1.8 ** (1 / 3), rtol=1e-5)
        turn = (out.angle - k.angle + 180.0) % 360.0 - 180.0
        np.testing.assert_allclose(turn, 0.0 if upright else 20.0, atol=1e-3)


def test_extract_writes_the_refined_frames(
    tmp_path: Path, scene_dir: Path, ckpt_dir: Path, call_main: Callable[..., MainResult]
) -> None:
    frames = _scaling_frames(tmp_path / "f.pt", math.log(0.8))
    out = tmp_path / "feats.h5"
    base = [
        "extract",
        str(scene_dir),
        "--method",
        "sosnet",
        "--weights",
        str(ckpt_dir / "sos.pt"),
        "--max-keypoints",
        "50",
        "--precision",
        "fp32",
    ]
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
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    photos = _photos(tmp_path / "ph")
    args = [
        "train",
        "--method",
        "frames",
        "--data",
        f"photos:{photos}",
        "--steps",
        "6",
        "--batch-size",
        "32",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "3",
        "--max-tilt",
        "3",
        "--pair-angle",
        "75",
        "--pair-scale",
        "1.8",
        "--pairs-per-image",
        "60",
        "--seed",
        "1",
    ]
    whole = tmp_path / "whole"
    assert call_main(*args, "--out", str(whole))[0] == 0
    ck = torch.load(whole / "frames.pt", weights_only=True)
    assert ck["method"] == "frames" and ck["meta"]["steps"] == 6
    assert "detector" in ck["meta"]["headline"]
    log = json.loads((whole / "train_log.json").read_text())["rows"]
    assert [r["step"] for r in log] == [3, 6]
    for key in ("detector_off", "refined_off", "angle_loss", "scale_loss"):
        assert all(math.isfinite(r[key]) for r in log)
    assert (whole / "train_log.csv").read_text().startswith("step,")
    assert len(list((whole / "pools").glob("*.npz"))) == 2
    # Interrupted after the first step (--time-limit 0), then resumed: the same weights.
    part = tmp_path / "part"
    assert call_main(*args, "--out", str(part), "--time-limit", "0")[0] == 0
    assert torch.load(part / "checkpoint.pt", weights_only=True)["step"] == 1
    code, _, err = call_main(*args, "--out", str(part))
    assert code != 0 and "--resume" in err
    assert call_main(*args, "--out", str(part), "--resume")[0] == 0
    a = torch.load(part / "frames.pt", weights_only=True)["state_dict"]
    for k, v in ck["state_dict"].items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=0)


def test_train_frames_refuses_other_sources(
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    code, _, err = call_main(
        "train",
        "--method",
        "frames",
        "--data",
        f"multiview:{tmp_path}",
        "--out",
        str(tmp_path / "r"),
    )
    assert code != 0 and "photos: sources only" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_frames_config_refuses_inconsistent_objectives(tmp_path: Path) -> None:
    from descmatch.train.frames import FramesConfig

    for kw, msg in (
        ({"objective": "affine"}, "choose one of"),
        ({"objective": "descriptor"}, "needs --teacher"),
        ({"teacher": "sosnet"}, "needs --frame-loss descriptor"),
        ({"covariant_weight": 1.0}, "adds to --frame-loss descriptor"),
        ({"objective": "descriptor", "teacher": "sosnet", "mean_weight": -1.0}, "weights >= 0"),
        ({"teacher_size_pool": (0.7, 1.4)}, "applies to --frame-loss descriptor"),
        (
            {"objective": "descriptor", "teacher": "sosnet", "teacher_size_pool": (0.0, 1.0)},
            "between 0 and 10",
        ),
    ):
        with pytest.raises(ConfigError, match=msg):
            FramesConfig(data=["photos:x"], out_dir=tmp_path, **kw)


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
    want = extract_patches(
        t, refined.src_xy, refined.src_size, refined.src_angle, pyramid=build_pyramid(t)
    )
    got = torch.from_numpy(refined.patches[:, 0]).float() / 255.0
    torch.testing.assert_close(got, want[:, 0], atol=1 / 255 + 1e-6, rtol=0)


def test_descriptor_training_with_frames_records_them(
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    frames = _scaling_frames(tmp_path / "f.pt", math.log(1.25))
    photos = _photos(tmp_path / "ph", 2)
    out = tmp_path / "run"
    code, _, err = call_main(
        "train",
        "--method",
        "hardnet",
        "--data",
        f"photos:{photos}",
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "16",
        "--val",
        "none",
        "--frames",
        str(frames),
        "--pairs-per-image",
        "64",
    )
    assert code == 0, err
    ck = torch.load(out / "hardnet.pt", weights_only=True)
    assert ck["meta"]["frames_sha256"] == sha256(frames)
    (pool,) = (out / "pools").iterdir()
    assert json.loads((pool / "meta.json").read_text())["frames_sha256"] == sha256(frames)
    code, _, err = call_main(
        "train",
        "--method",
        "frames",
        "--data",
        f"photos:{photos}",
        "--out",
        str(tmp_path / "r2"),
        "--frames",
        str(frames),
    )
    assert code != 0 and "--frames applies to descriptor nets" in err


def test_resample_cuts_patches_as_extract_patches_does_in_the_refined_frames() -> None:
    from descmatch.patches import extract_patches

    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.random((300, 300)).astype(np.float32), (0, 0), 2.0)
    img = torch.from_numpy((img - img.min()) / (img.max() - img.min()))
    xy = np.array([[150.0, 150.0], [140.0, 160.0]])
    size, angle = np.array([6.0, 7.0]), np.array([20.0, 300.0])
    ctx = extract_patches(img, xy, size, angle, patch_size=CONTEXT_PX, window_factor=CONTEXT)
    zero = torch.zeros(2)
    same = resample(ctx, zero, zero, 1.0, 32)
    torch.testing.assert_close(same, extract_patches(img, xy, size, angle), rtol=0, atol=1e-4)
    for deg, rho in ((30.0, 0.0), (-40.0, 0.1), (0.0, -0.2)):
        got = resample(ctx, torch.full((2,), math.radians(deg)), torch.full((2,), rho), 1.0, 32)
        want = extract_patches(img, xy, size * math.exp(rho), angle + deg)
        wrong = extract_patches(img, xy, size * math.exp(-rho), angle - deg)
        err = float((got - want).abs().mean())
        assert err < 0.012, (deg, rho, err)  # two bilinear interpolations apart
        assert float((got - wrong).abs().mean()) > 4 * err
    # Differentiable in the frame.
    theta = torch.zeros(2, requires_grad=True)
    rho_t = torch.zeros(2, requires_grad=True)
    resample(ctx, theta, rho_t, 1.0, 32).square().sum().backward()
    assert theta.grad is not None and bool((theta.grad != 0).all())
    assert rho_t.grad is not None and bool((rho_t.grad != 0).all())


def test_a_central_surround_teacher_describes_from_context_and_surround(ckpt_dir: Path) -> None:
    from descmatch.patches import extract_patches
    from descmatch.train.frames import _teacher_descriptors

    rng = np.random.default_rng(1)
    img = cv2.GaussianBlur(rng.random((300, 300)).astype(np.float32), (0, 0), 1.5)
    img = torch.from_numpy((img - img.min()) / (img.max() - img.min()))
    xy = rng.uniform(100, 200, (40, 2))
    size, angle = rng.uniform(3, 6, 40), rng.uniform(0, 360, 40)
    net = load_net("l2net-cs", ckpt_dir / "cs.pt").net.eval()
    with torch.no_grad():
        want = net(extract_patches(img, xy, size, angle, patch_size=64, window_factor=2))
        ctx = extract_patches(img, xy, size, angle, patch_size=CONTEXT_PX, window_factor=CONTEXT)
        sur = extract_patches(
            img, xy, size, angle, patch_size=CONTEXT_PX, window_factor=2 * CONTEXT
        )
        zero = torch.zeros(40)
        got = _teacher_descriptors(net, (ctx, sur), zero, zero)
    # The surround stream sees a coarser pyramid level where describe() averages 2x2 pixels.
    assert float((got * want).sum(1).min()) > 0.95
    # Size-pooled: the normalised sum of the descriptors at each factor of the size, and
    # close to what the describer's --size-pool computes from the image.
    with torch.no_grad():
        pooled = _teacher_descriptors(net, (ctx, sur), zero, zero, (0.7, 1.4))
        parts = [
            _teacher_descriptors(net, (ctx, sur), zero, zero + math.log(f)) for f in (0.7, 1.4)
        ]
        want = net(
            torch.cat(
                [
                    extract_patches(img, xy, size * f, angle, patch_size=64, window_factor=2)
                    for f in (0.7, 1.4)
                ]
            )
        )
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(parts[0] + parts[1]))
    want = torch.nn.functional.normalize(want[:40] + want[40:])
    assert float((pooled * want).sum(1).min()) > 0.95
    assert float((pooled * got).sum(1).mean()) < 0.999  # pooling changes the descriptor


def test_train_frames_through_a_descriptor(
    tmp_path: Path, ckpt_dir: Path, call_main: Callable[..., MainResult]
) -> None:
    photos = _photos(tmp_path / "ph")
    init = _scaling_frames(tmp_path / "init.pt", math.log(1.1))
    args = [
        "train",
        "--method",
        "frames",
        "--data",
        f"photos:{photos}",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--eval-every",
        "2",
        "--max-tilt",
        "3",
        "--pair-angle",
        "75",
        "--pair-scale",
        "1.8",
        "--pairs-per-image",
        "40",
        "--seed",
        "1",
        "--frame-loss",
        "descriptor",
        "--rotation",
    ]
    args_init = [*args, "--init", str(init)]
    out = tmp_path / "run"
    code, _, err = call_main(*args_init, "--teacher", str(ckpt_dir / "sos.pt"), "--out", str(out))
    assert code == 0, err
    ck = torch.load(out / "frames.pt", weights_only=True)
    meta = ck["meta"]
    assert meta["teacher_sha256"] == sha256(ckpt_dir / "sos.pt")
    assert "mutual NN" in meta["headline"]
    net = load_net("frames", out / "frames.pt").net
    assert net.rotation and net.conf["max_scale"] == 2.0  # the init's conf, plus rotation
    log = json.loads((out / "train_log.json").read_text())["rows"]
    assert [r["step"] for r in log] == [2, 4]
    for key in ("descriptor_loss", "detector_mnn", "refined_mnn", "val_descriptor_loss"):
        assert all(math.isfinite(r[key]) for r in log)
    pool = np.load(next((out / "pools").glob("*-train.npz")))
    assert pool["patches"].shape[2:] == (CONTEXT_PX, CONTEXT_PX) and "surround" not in pool
    # A central-surround teacher (its pools hold the surround too), a narrower net from
    # scratch, the covariant loss added.
    cs = tmp_path / "cs"
    code, _, err = call_main(
        *args,
        "--teacher",
        str(ckpt_dir / "cs.pt"),
        "--out",
        str(cs),
        "--width",
        "8",
        "--covariant-weight",
        "0.5",
        "--teacher-size-pool",
        "0.7,1.4",
    )
    assert code == 0, err
    assert load_net("frames", cs / "frames.pt").net.conf["width"] == 8
    ck = torch.load(cs / "frames.pt", weights_only=True)
    assert tuple(ck["meta"]["config"]["teacher_size_pool"]) == (0.7, 1.4)
    pool = np.load(next((cs / "pools").glob("*-train.npz")))
    assert pool["surround"].shape == pool["patches"].shape
    log = json.loads((cs / "train_log.json").read_text())["rows"]
    assert all(math.isfinite(r["refined_mnn"]) for r in log)
    # Bad combinations: one line each, nothing written.
    for extra, msg in (
        (["--teacher", str(init)], "not descmatch descriptor weights"),
        ([], "needs --teacher"),
    ):
        bad = tmp_path / f"bad{len(extra)}"
        code, _, err = call_main(*args_init, *extra, "--out", str(bad))
        assert code != 0 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()
    code, _, err = call_main(
        "train",
        "--method",
        "sosnet",
        "--data",
        f"photos:{photos}",
        "--teacher",
        "sosnet",
        "--out",
        str(tmp_path / "x"),
    )
    assert code != 0 and "apply to --method frames" in err
    code, _, err = call_main(
        "train",
        "--method",
        "sosnet",
        "--data",
        f"photos:{photos}",
        "--teacher-size-pool",
        "auto",
        "--out",
        str(tmp_path / "x"),
    )
    assert code != 0 and "apply to --method frames" in err
