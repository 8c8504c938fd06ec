"""Distillation: the student net (shapes, cost, batch-norm folding), the distillation pool (the
teacher's descriptors computed once, aligned with the patches), and the distillation objective
through the one Trainer (the loss falls, resume is exact, the teacher is not run again)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import fixtures_sfm
import numpy as np
import pytest
import torch
from conftest import MainResult, write_scenes

import descmatch.train.distill as distill_mod
from descmatch.describe import NetDescriber, build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import ConfigError, WeightsError
from descmatch.nets import NETS, FrameNet, build_net
from descmatch.nets.cost import count_macs
from descmatch.nets.fold import fold_batchnorm
from descmatch.patches import extract_patches
from descmatch.train.distill import DistillConfig, train_distill
from descmatch.train.distillpool import Teacher, photo_distill_pairs
from descmatch.train.photos import PhotoPairConfig, load_photo
from descmatch.train.runlog import read_log
from descmatch.train.teacherpool import TeacherPool
from descmatch.weights import load_net, save_checkpoint, sha256

pytestmark = pytest.mark.usefixtures("one_thread")


def test_student_shapes_cost_and_folding() -> None:
    assert NETS["student"].patch_size == 64 and NETS["student"].window_factor == 2.0
    net = build_net("student", {"width": 8, "dim": 128})
    net.train()
    x = torch.rand(6, 1, 64, 64)
    for _ in range(3):  # move the batch-norm statistics away from their start
        net(x * torch.rand(6, 1, 1, 1) + 0.1)
    net.eval()
    with torch.no_grad():
        d = net(x)
        folded = fold_batchnorm(net)
        assert d.shape == (6, 128)
        assert torch.allclose(d.norm(dim=1), torch.ones(6), atol=1e-5)
        assert torch.allclose(folded(x), d, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # The documented cost: 9.5 M multiply-adds at the default width and dimension.
    assert count_macs(build_net("student"), (1, 64, 64)) == 9_469_952
    with pytest.raises(ConfigError, match="valid keys"):
        build_net("student", {"depth": 3})


def test_the_unshuffle_stem_folds_the_patch_and_has_no_full_resolution_convolution() -> None:
    net = build_net("student", {"width": 8, "stem": "unshuffle"})
    net.train()
    x = torch.rand(5, 1, 64, 64)
    net(x * torch.rand(5, 1, 1, 1) + 0.1)
    net.eval()
    with torch.no_grad():
        d = net(x)
        assert d.shape == (5, 256)
        assert torch.allclose(fold_batchnorm(net)(x), d, atol=1e-5)
    first = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][0]
    assert first.in_channels == 4  # the 2x2-folded 16x16 input
    assert count_macs(net, (1, 64, 64)) == 2_670_592  # against 2,965,504 with the conv stem
    with pytest.raises(ConfigError, match="stem one of conv, unshuffle"):
        build_net("student", {"stem": "pool"})


@pytest.mark.parametrize(("stem", "views"), [("conv", 2), ("unshuffle", 2), ("unshuffle", 3)])
def test_the_inference_form_runs_both_streams_as_one_grouped_stream(stem: str, views: int) -> None:
    net = build_net("student", {"width": 6, "dim": 64, "stem": stem, "views": views})
    net.train()
    x = torch.rand(7, *net.input_shape())
    for _ in range(3):
        net(x * torch.rand(7, 1, 1, 1) + 0.1)
    net.eval()
    fused = net.inference_form()
    with torch.no_grad():
        d, maps = net.forward_features(x)
        d2, maps2 = fused.forward_features(x)
        assert torch.allclose(d2, d, atol=1e-5) and len(maps) == len(maps2) == views
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(maps, maps2, strict=True))
    assert fused.streams is not None
    convs = [m for m in fused.streams if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == (5 if stem == "conv" else 4)  # one per layer
    assert all(m.groups == views for m in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert count_macs(fused, net.input_shape()) == count_macs(net, net.input_shape())
    assert net.center is not None  # the trained net itself is left as it was
    describer = NetDescriber(net, torch.device("cpu"), 4)
    assert describer.net.streams is not None
    assert torch.allclose(describer.describe_patches(x), d, atol=1e-5)


class _CountingTeacher(Teacher):
    """A small random SOSNet with size pooling as the teacher, counting its calls."""

    def __init__(self) -> None:
        torch.manual_seed(3)
        net = build_net("sosnet")
        d = NetDescriber(net.eval(), torch.device("cpu"), size_pool=(0.7, 1.4))
        super().__init__(d, {"method": "test", "size_pool": [0.7, 1.4], "dim": 128})
        self.calls = 0

    def __call__(self, image, xy, size, angle):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().__call__(image, xy, size, angle)


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> _CountingTeacher:
    t = _CountingTeacher()
    monkeypatch.setattr(distill_mod, "load_teacher", lambda spec: t)
    return t


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    write_scenes(tmp_path / "photos", 4, width=240, height=180)
    return tmp_path / "photos"


def _cfg(data: str, out: Path, **kw: object) -> DistillConfig:
    base: dict[str, object] = dict(
        data=[data],
        out_dir=out,
        net_conf={"width": 4, "dim": 128},
        steps=8,
        batch_size=16,
        images_per_batch=2,
        pairs_per_image=24,
        val_fraction=0.25,
        val_points=20,
        eval_every=4,
        checkpoint_every=4,
        log_every=1,
        precision="fp32",
        # A random teacher's descriptors are nearly parallel: its similarity matrix is far
        # from a fresh student's, so the tests weigh the three terms alike (default 10).
        similarity_weight=1.0,
    )
    base.update(kw)
    return DistillConfig(**base)  # type: ignore[arg-type]


def _pool_of(run: Path) -> Path:
    (pool,) = list((run / "pools").glob("distill-*"))
    return pool


def test_teacher_is_cached_in_the_pool_and_not_run_again(
    photos: Path, tmp_path: Path, teacher: _CountingTeacher
) -> None:
    run = tmp_path / "run"
    path = train_distill(_cfg(f"photos:{photos}", run, steps=2))
    calls = teacher.calls
    assert calls == 2 * 4  # both views of each of the 4 photos, once
    pool = TeacherPool.load(_pool_of(run))
    assert pool.teacher.dtype == np.float16 and pool.teacher.shape == (len(pool.views), 128)
    # The cached rows are the teacher's descriptors of the photo's keypoints, in order.
    first = sorted(photos.iterdir())[0]
    views, desc = photo_distill_pairs(
        load_photo(first),
        np.random.default_rng([0, 0]),
        _CountingTeacher(),
        PhotoPairConfig(),
        64,
        10.0,
        2.0,
        24,
    )
    k = len(views)
    np.testing.assert_array_equal(pool.views[:k], views)
    np.testing.assert_allclose(pool.teacher[:k].astype(np.float32), desc, atol=2e-3)
    meta = load_net("student", path).meta
    assert meta["frames"] == "none" and meta["size_pool"] == [1.0]
    # Resuming (and a longer run on the same data) describes nothing again.
    cfg = _cfg(f"photos:{photos}", run, steps=2, resume=True)
    train_distill(cfg)
    train_distill(_cfg(f"photos:{photos}", tmp_path / "other", steps=1))
    assert teacher.calls == calls + 2 * 4  # only the new run's own pool


class _Stop(Exception):
    pass


def test_loss_falls_and_resume_is_exact(
    photos: Path, tmp_path: Path, teacher: _CountingTeacher
) -> None:
    train_distill(_cfg(f"photos:{photos}", tmp_path / "build", steps=1))
    data = f"pool:{_pool_of(tmp_path / 'build')}"

    def losses(texts: list[str]) -> list[float]:
        return [float(t.split()[1]) for t in texts]

    straight: list[str] = []
    a = train_distill(
        _cfg(data, tmp_path / "a", steps=30, lr=3e-3), lambda i, n, t: straight.append(t)
    )
    got = losses(straight)
    assert np.mean(got[-5:]) < 0.8 * np.mean(got[:5]), got
    rows = read_log(tmp_path / "a")
    assert rows[-1]["fpr95"] is not None and rows[-1]["teacher_fpr95"] is not None

    first: list[str] = []

    def crash(i: int, n: int, t: str) -> None:
        first.append(t)
        if i == 12:
            raise _Stop

    with pytest.raises(_Stop):
        train_distill(_cfg(data, tmp_path / "b", steps=30, lr=3e-3), crash)
    resumed: list[str] = []
    b = train_distill(
        _cfg(data, tmp_path / "b", steps=30, lr=3e-3, resume=True),
        lambda i, n, t: resumed.append(t),
    )
    assert len(resumed) == 18
    assert losses(first + resumed) == got
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k


def test_cli_trains_a_student_and_extract_uses_it_alone(
    photos: Path, tmp_path: Path, teacher: _CountingTeacher, call_main: Callable[..., MainResult]
) -> None:
    train_distill(_cfg(f"photos:{photos}", tmp_path / "build", steps=1))
    out = tmp_path / "cli"
    args = ["train", "--method", "distill", "--teacher", "auto", "--width", "4"]
    args += ["--data", f"pool:{_pool_of(tmp_path / 'build')}", "--out", str(out)]
    code, _, err = call_main(*args, "--steps", "2", "--batch-size", "16", "--stem", "unshuffle")
    assert code == 0, err
    loaded = load_net("student", out / "student.pt")
    assert loaded.meta["steps"] == 2 and loaded.net.conf["width"] == 4
    assert loaded.net.conf["stem"] == "unshuffle"
    code, _, err = call_main(
        "train", "--method", "hardnet", "--data", "photos:x", "--stem", "unshuffle"
    )
    assert code != 0 and "--stem and --views apply to --method distill" in err
    # Defaults (--frames auto, --size-pool auto) describe the one patch: no refiner, no pool.
    d = build_describer("student", str(out / "student.pt"))
    assert isinstance(d, NetDescriber) and d.frames is None and d.size_pool == (1.0,)


def test_a_three_view_student_trains_on_its_own_cuts_and_describes_with_them(
    photos: Path, tmp_path: Path, teacher: _CountingTeacher
) -> None:
    conf = {"width": 4, "dim": 128, "views": 3}
    path = train_distill(_cfg(f"photos:{photos}", tmp_path / "v3", net_conf=conf, mr_size=7.0))
    pool = _pool_of(tmp_path / "v3")
    meta = json.loads((pool / "meta.json").read_text())
    assert meta["patch_size"] == 32 and meta["window_factor"] == [1.0, 2.0, 4.0]
    views = np.load(pool / "views.npy")
    assert views.shape[1:] == (3, 32, 32)
    loaded = load_net("student", path)
    assert loaded.net.input_shape() == (3, 32, 32) and loaded.meta["mr_size"] == 7.0
    # Three width-4 streams (258,048 each) and a head over their 3 x 16 maps of 8x8.
    assert count_macs(loaded.net, (3, 32, 32)) == 3 * 258_048 + 64 * 48 * 128
    # A two-view student cannot train on three-view cuts.
    with pytest.raises(ConfigError, match="not cut for the student's input"):
        train_distill(_cfg(f"pool:{pool}", tmp_path / "v2", steps=1))
    # The describer cuts the three views as the pool did and runs the fused net on them.
    d = build_describer("student", str(path), precision="fp32")
    assert isinstance(d, NetDescriber) and d.mr_size == 7.0
    image = load_photo(next(iter(sorted(photos.iterdir()))), 240)
    kps = SiftDetector(max_keypoints=50)(image)
    got = d.describe(image, kps)
    cut = extract_patches(image, kps.xy, kps.size, kps.angle, 32, 7.0, (1.0, 2.0, 4.0))
    with torch.no_grad():
        want = loaded.net.eval()(cut).numpy()
    assert got.shape == (len(kps), 128) and np.abs(got - want).max() < 1e-4


def test_a_three_view_student_trains_on_multiview_tracks(
    tmp_path: Path, teacher: _CountingTeacher
) -> None:
    rig = fixtures_sfm.Rig(width=320, height=240, focal=260.0)
    fixtures_sfm.make_scene(tmp_path / "scenes" / "corner", 3, 1, rig=rig)
    conf = {"width": 4, "dim": 128, "views": 3}
    cfg = _cfg(f"multiview:{tmp_path / 'scenes'}", tmp_path / "mv", net_conf=conf, mr_size=7.0)
    path = train_distill(replace(cfg, steps=2, points_per_image=60))
    assert load_net("student", path).net.input_shape() == (3, 32, 32)
    (base,) = [p for p in (tmp_path / "mv" / "pools").glob("multiview-*") if p.is_dir()]
    views = np.load(base / "views.npy", mmap_mode="r")
    pairs = np.load(base / "pairs.npy", mmap_mode="r")
    assert views.shape[1:] == (3, 32, 32) and pairs.shape[1:] == (2, 3, 32, 32)


def test_distillation_data_must_be_photos_multiview_or_pools(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distillation data"):
        train_distill(_cfg(f"brown:{tmp_path}", tmp_path / "run"))


def test_pools_cut_at_other_window_sizes_are_not_mixed(
    photos: Path, tmp_path: Path, teacher: _CountingTeacher
) -> None:
    train_distill(_cfg(f"photos:{photos}", tmp_path / "at10", steps=1))
    train_distill(_cfg(f"photos:{photos}", tmp_path / "at14", steps=1, mr_size=14.0))
    a, b = _pool_of(tmp_path / "at10"), _pool_of(tmp_path / "at14")
    path = train_distill(_cfg(f"pool:{b}", tmp_path / "one", steps=1))
    assert load_net("student", path).meta["mr_size"] == 14.0
    with pytest.raises(ConfigError, match="mr_size 14.0"):
        cfg = _cfg(f"pool:{a}", tmp_path / "mixed")
        cfg.data.append(f"pool:{b}")
        train_distill(cfg)


def test_cli_photo_pair_options_make_the_distillation_pool(
    photos: Path, tmp_path: Path, teacher: _CountingTeacher, call_main: Callable[..., MainResult]
) -> None:
    out = tmp_path / "cli"
    args = ["train", "--method", "distill", "--width", "4", "--data", f"photos:{photos}"]
    args += ["--out", str(out), "--steps", "1", "--batch-size", "16", "--pairs-per-image", "24"]
    code, _, err = call_main(*args, "--max-tilt", "3", "--pair-angle", "50", "--pair-scale", "1.5")
    assert code == 0, err
    conf = TeacherPool.load(_pool_of(out)).meta["photo_conf"]
    assert (conf["max_tilt"], conf["max_angle_diff"], conf["max_size_ratio"]) == (3.0, 50.0, 1.5)


def _refiner(path: Path) -> Path:
    """A small frame refiner that does rescale: its head's bias moves every log scale."""
    torch.manual_seed(5)
    net = FrameNet({"width": 2})
    with torch.no_grad():
        assert net.head.bias is not None
        net.head.bias.fill_(0.8)
    return save_checkpoint(path, net, {"mr_size": 10.0})


def test_a_student_with_its_own_refiner_is_cut_trained_and_described_in_its_frames(
    photos: Path,
    tmp_path: Path,
    teacher: _CountingTeacher,
    call_main: Callable[..., MainResult],
) -> None:
    ref = _refiner(tmp_path / "ref.pt")
    run = tmp_path / "run"
    path = train_distill(_cfg(f"photos:{photos}", run, steps=1, frames=str(ref)))
    pool = TeacherPool.load(_pool_of(run))
    assert pool.meta["frames_sha256"] == sha256(ref)
    # The student's views are cut in the refined frames; the teacher describes the detector's.
    first = sorted(photos.iterdir())[0]
    args = (PhotoPairConfig(), 64, 10.0, 2.0, 24)
    plain_views, plain = photo_distill_pairs(
        load_photo(first), np.random.default_rng([0, 0]), _CountingTeacher(), *args
    )
    views, desc = photo_distill_pairs(
        load_photo(first),
        np.random.default_rng([0, 0]),
        _CountingTeacher(),
        *args,
        load_net("frames", ref).net,
        10.0,
    )
    k = len(views)
    np.testing.assert_array_equal(pool.views[:k], views)
    assert np.abs(views.astype(int) - plain_views).mean() > 5
    np.testing.assert_array_equal(desc, plain)
    # The student names its refiner, a copy beside it, and describes with it by default.
    meta = load_net("student", path).meta
    assert meta["frames"] == "student-frames.pt" and meta["frames_sha256"] == sha256(ref)
    assert sha256(run / "student-frames.pt") == sha256(ref)
    d = build_describer("student", str(path))
    assert isinstance(d, NetDescriber) and d.frames is not None
    plain_d = build_describer("student", str(path), frames="none")
    assert isinstance(plain_d, NetDescriber) and plain_d.frames is None
    # A pool is used only with the refiner that cut it.
    cut_elsewhere = "cut in the frames of the refiner with sha256 .*, the run's in the detector's"
    with pytest.raises(ConfigError, match=cut_elsewhere):
        train_distill(_cfg(f"pool:{_pool_of(tmp_path / 'run')}", tmp_path / "x", frames=None))
    code, _, err = call_main(
        "train", "--method", "distill", "--width", "4", "--data", f"pool:{_pool_of(run)}",
        "--out", str(tmp_path / "cli"), "--steps", "1", "--batch-size", "16",
        "--frames", str(ref),
    )  # fmt: skip
    assert code == 0, err
    assert load_net("student", tmp_path / "cli" / "student.pt").meta["frames_sha256"] == sha256(ref)
    # Without its refiner beside it, or with another one there, the student says so.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "student.pt").write_bytes(path.read_bytes())
    with pytest.raises(WeightsError, match="student-frames.pt is not beside it"):
        build_describer("student", str(moved / "student.pt"))
    save_checkpoint(moved / "student-frames.pt", FrameNet({"width": 2}), {})
    with pytest.raises(WeightsError, match="sha256 differs"):
        build_describer("student", str(moved / "student.pt"))
