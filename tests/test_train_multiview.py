"""Multi-view training patches: cameras.txt, the epipolar and triangulation geometry, tracks of a
rendered scene with known cameras, the pool (round trip, pair agreement, multi-view gather,
resume) and a ``multiview:`` source through the training loop."""

from __future__ import annotations

import json
from pathlib import Path

import fixtures_sfm
import numpy as np
import pytest
from fixtures_sfm import Rig, look_at

from descmatch.errors import InputError, OutputError
from descmatch.train.descriptors import DataSpec, TrainConfig, train
from descmatch.train.multiview import (
    Camera,
    MultiviewPairPool,
    TrackConfig,
    build_multiview_pool,
    connected_components,
    cut_patches,
    epipolar_distance,
    find_scenes,
    fundamental_matrix,
    read_cameras,
    scene_tracks,
    triangulate,
    view_pairs,
)
from descmatch.train.pool import PairPool, is_pool
from descmatch.train.samplers import SameImageSampler

#: The multi-view training scenes: two walls, 320x240, an off-centre principal point.
RIG = Rig(
    width=320,
    height=240,
    focal=260.0,
    fy_ratio=1.01,
    pp_offset=(3.0, -2.0),
    tex=256,
    blur=0.8,
    floor=False,
    background=0.0,
    arc=18.0,
    radius=4.0,
    y0=0.0,
    y_jitter=0.15,
    target=(0.0, 0.0, -0.6),
)
WIDTH, HEIGHT, FOCAL = RIG.width, RIG.height, RIG.focal


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny work: one thread is as fast


def make_scene(folder: Path, num_views: int = 4, seed: int = 0) -> list[Camera]:
    """Render a room corner (two textured walls) into ``num_views`` cameras on an arc and write
    ``images/`` and ``cameras.txt``."""
    return fixtures_sfm.make_scene(folder, num_views, seed, rig=RIG)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two rendered scenes."""
    root = tmp_path_factory.mktemp("multiview")
    make_scene(root / "corner-a", 4, seed=1)
    make_scene(root / "corner-b", 3, seed=5)
    return root


TINY = {"max_keypoints": 1500, "pair_window": 3, "patch_size": 32, "mr_size": 6.0}


@pytest.fixture(scope="module")
def pool_dir(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_multiview_pool(scenes, tmp_path_factory.mktemp("mvpool") / "pool", **TINY)


def _standardized(p: np.ndarray) -> np.ndarray:
    f = p.reshape(len(p), -1).astype(np.float32)
    f = f - f.mean(1, keepdims=True)
    return f / (f.std(1, keepdims=True) + 1e-3)


def test_read_cameras_round_trip(scenes: Path) -> None:
    cams = read_cameras(scenes / "corner-a" / "cameras.txt")
    assert list(cams) == ["v0.png", "v1.png", "v2.png", "v3.png"]
    c = cams["v1.png"]
    assert (c.width, c.height) == (WIDTH, HEIGHT) and c.K[0, 0] == FOCAL
    np.testing.assert_allclose(c.R @ c.R.T, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(c.P, c.K @ np.hstack([c.R, c.t[:, None]]))
    # The world origin region is in front of every camera.
    assert all(cam.project(np.zeros((1, 3)))[1][0] > 0 for cam in cams.values())


@pytest.mark.parametrize(
    "line, what",
    [
        ("a.png 320 240 260 260 160 120 1 0 0 0 1 0 0 0 1 0 0", "expected 19 fields"),
        ("a.png 320 240 260 260 160 120 1 0 0 0 1 0 0 0 1 0 0 x", "'x' is not a number"),
        ("a.png 320.5 240 260 260 160 120 1 0 0 0 1 0 0 0 1 0 0 4", "positive integers"),
        ("a.png 320 240 -260 260 160 120 1 0 0 0 1 0 0 0 1 0 0 4", "focal lengths"),
        ("a.png 320 240 260 260 160 120 1 0 0 0 2 0 0 0 1 0 0 4", "not a rotation"),
        ("a.png 320 240 260 260 160 120 1 0 0 0 1 0 0 0 -1 0 0 4", "not a rotation"),
    ],
)
def test_read_cameras_rejects_malformed_lines(tmp_path: Path, line: str, what: str) -> None:
    good = "ok.png 320 240 260 260 160 120 1 0 0 0 1 0 0 0 1 0 0 4"
    path = tmp_path / "cameras.txt"
    path.write_text(f"# header\n{good}\n\n{line}\n")
    with pytest.raises(InputError, match=f"cameras.txt:4: .*{what}"):
        read_cameras(path)


def test_read_cameras_duplicate_and_empty(tmp_path: Path) -> None:
    good = "ok.png 320 240 260 260 160 120 1 0 0 0 1 0 0 0 1 0 0 4"
    path = tmp_path / "cameras.txt"
    path.write_text(f"{good}\n{good}\n")
    with pytest.raises(InputError, match="cameras.txt:2: .*twice"):
        read_cameras(path)
    path.write_text("# nothing\n")
    with pytest.raises(InputError, match="no cameras"):
        read_cameras(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a multi-view scene"):
        find_scenes(tmp_path / "empty")
    with pytest.raises(InputError, match="no such folder"):
        find_scenes(tmp_path / "nope")


def test_epipolar_and_triangulation_geometry() -> None:
    rng = np.random.default_rng(0)
    k = np.array([[300.0, 0, 160], [0, 310, 120], [0, 0, 1]])
    cams = []
    for i in range(3):
        r, t = look_at(np.array([1.5 * i - 1.5, 0.3 * i, -5.0]), np.zeros(3))
        cams.append(Camera(f"c{i}", 320, 240, k, r, t))
    xyz = rng.uniform(-1, 1, (50, 3))
    pix = [c.project(xyz)[0] for c in cams]
    f = fundamental_matrix(cams[0], cams[1])
    assert epipolar_distance(f, pix[0], pix[1]).max() < 1e-6
    shifted = pix[1] + rng.normal(0, 1, pix[1].shape) * 5
    assert np.median(epipolar_distance(f, pix[0], shifted)) > 0.5
    # Tracks of lengths 2 and 3 mixed; with noise-free pixels the points come back exactly.
    obs_image = np.r_[np.tile([0, 1, 2], 25), np.tile([0, 2], 25)]
    obs_xy = np.concatenate(
        [np.stack([pix[g][j] for g in (0, 1, 2)]) for j in range(25)]
        + [np.stack([pix[g][j] for g in (0, 2)]) for j in range(25, 50)]
    )
    offsets = np.r_[np.arange(0, 75, 3), np.arange(75, 126, 2)]
    np.testing.assert_allclose(triangulate(cams, obs_image, obs_xy, offsets), xyz, atol=1e-6)
    assert view_pairs(cams, 1) == [(0, 1), (1, 2)]
    assert view_pairs(cams, 1, max_view_angle=1.0) == []


def test_connected_components() -> None:
    lab = connected_components(7, np.array([0, 3, 5, 2]), np.array([1, 4, 4, 6]))
    assert lab.tolist() == [0, 0, 2, 3, 3, 3, 2]
    # A long chain given in reverse order needs many rounds.
    n = 200
    lab = connected_components(n, np.arange(n - 1)[::-1], np.arange(1, n)[::-1])
    assert (lab == 0).all()


def test_scene_tracks_reproject(scenes: Path) -> None:
    conf = TrackConfig(max_keypoints=1500, pair_window=3, window=6.0)
    tr = scene_tracks(scenes / "corner-a", conf)
    st = tr.stats
    assert st["images"] == 4 and st["tracks"] > 150, st
    assert st["observations"] == len(tr.obs_image) == tr.offsets[-1]
    assert st["mean_track_length"] > 2.3 and st["mean_reproj_px"] < 0.5, st
    assert tr.obs_err.max() < 2.0
    # Every track: one keypoint per image, all its views in front, reprojecting within 2 px,
    # and its point on one of the two walls (the true geometry).
    for k in range(tr.num_tracks):
        imgs = tr.obs_image[tr.offsets[k] : tr.offsets[k + 1]]
        assert len(np.unique(imgs)) == len(imgs) >= 2
    for g, cam in enumerate(tr.cameras):
        rows = np.flatnonzero(tr.obs_image == g)
        track = np.searchsorted(tr.offsets, rows, side="right") - 1
        pix, z = cam.project(tr.xyz[track])
        assert (z > 0).all()
        assert np.linalg.norm(pix - tr.obs_xy[rows], axis=1).max() < 2.0
    normals = [np.array([1.0, 0, -1]) / np.sqrt(2), np.array([-1.0, 0, -1]) / np.sqrt(2)]
    wall_dist = np.min([np.abs(tr.xyz @ n) for n in normals], axis=0)
    assert np.median(wall_dist) < 0.01 and np.mean(wall_dist < 0.05) > 0.95


def test_downscaled_images_keep_the_cameras_exact(scenes: Path) -> None:
    conf = TrackConfig(max_keypoints=1500, pair_window=3, window=6.0, max_side=240)
    tr = scene_tracks(scenes / "corner-a", conf)
    assert tr.images[0].shape == (180, 240) and tr.cameras[0].width == 240
    assert tr.stats["tracks"] > 50 and tr.stats["mean_reproj_px"] < 0.5


def test_pool_round_trip_and_pairs_agree(pool_dir: Path, scenes: Path) -> None:
    assert is_pool(pool_dir) and not (pool_dir / "parts").exists()
    meta = json.loads((pool_dir / "meta.json").read_text())
    assert meta["kind"] == "multiview" and len(meta["scenes"]) == 2
    assert meta["images"][:2] == ["corner-a/v0.png", "corner-a/v1.png"]
    assert len(meta["images"]) == 7 and len(meta["offsets"]) == 8
    for st in meta["scenes"]:
        assert st["tracks"] > 0 and st["mean_reproj_px"] < 1.0
        assert st["patch_agreement"]["pairs"] < 0.6 * st["patch_agreement"]["shuffled"]
    # A plain pair pool: the fixed pairs, grouped by (anchor) image.
    plain = PairPool.load(pool_dir)
    assert plain.num_points == meta["num_pairs"] == plain.group_offsets[-1]
    pairs = np.asarray(plain.pairs)
    a, b = _standardized(pairs[:, 0]), _standardized(pairs[:, 1])
    same = np.abs(a - b).mean()
    shuffled = np.abs(a - np.roll(b, 7, 0)).mean()
    assert same < 0.5 * shuffled, (same, shuffled)
    # The multi-view pool: every gather draws a view among the point's others.
    pool = MultiviewPairPool.load(pool_dir)
    assert pool.num_points == plain.num_points and pool.num_groups == 7
    assert np.diff(pool.view_offsets).min() >= 2
    views = np.asarray(pool.views)
    assert len(views) == meta["num_views"] > pool.num_points * 2
    long_pts = np.flatnonzero(np.diff(pool.view_offsets) >= 3)
    rng = np.random.default_rng(0)
    seen = {tuple(pool.gather(long_pts[:1], rng)[0, 1].ravel()[:64]) for _ in range(30)}
    assert len(seen) >= 2
    got = pool.gather(np.arange(pool.num_points), rng)
    np.testing.assert_array_equal(got[:, 0], pairs[:, 0])
    g0, g1 = _standardized(got[:, 0]), _standardized(got[:, 1])
    assert np.abs(g0 - g1).mean() < 0.5 * np.abs(g0 - np.roll(g1, 7, 0)).mean()
    # Batches from few images; crop, split and verification sets work as for photo pools.
    sampler = SameImageSampler(pool.group_offsets, pool.num_points, 32, images_per_batch=2)
    pts = sampler.points(np.random.default_rng(1))
    groups = np.searchsorted(pool.group_offsets, pts, side="right") - 1
    assert len(np.unique(groups)) <= 3 and len(np.unique(pts)) == 32
    crop = pool.center_crop(16)
    assert crop.gather(np.arange(4), np.random.default_rng(0)).shape == (4, 2, 16, 16)
    train_part, held = pool.split(0.3, seed=0)
    assert train_part.num_points + held.num_points == pool.num_points
    assert isinstance(held, MultiviewPairPool)
    patches, i0, i1, is_match = held.verification_set(40)
    assert patches.shape[1:] == (32, 32) and is_match.sum() == len(is_match) // 2
    # Tracks file: per observation its image and reprojection error.
    tracks = np.load(pool_dir / "tracks.npz")
    assert len(tracks["obs_image"]) == len(views) and tracks["obs_err"].max() < 2.0
    assert len(tracks["xyz"]) == pool.num_points


def test_pool_is_reused_resumed_and_guarded(pool_dir: Path, scenes: Path, tmp_path: Path) -> None:
    assert build_multiview_pool(scenes, pool_dir, **TINY) == pool_dir
    with pytest.raises(OutputError):
        build_multiview_pool(scenes, pool_dir, **{**TINY, "reproj_px": 1.0})
    # An interrupted build (the second scene crashes) keeps the first scene's part.
    out = tmp_path / "pool"

    def crash(i: int, n: int, text: str) -> None:
        if text.startswith("corner-b"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_multiview_pool(scenes, out, progress=crash, **TINY)
    assert sorted(p.name for p in (out / "parts").iterdir()) == [
        "scene_000.json",
        "scene_000.npz",
        "settings.json",
    ]
    made: list[str] = []
    build_multiview_pool(scenes, out, progress=lambda i, n, t: made.append(t), **TINY)
    assert made and all(t.startswith("corner-b") for t in made)
    np.testing.assert_array_equal(np.load(out / "views.npy"), np.load(pool_dir / "views.npy"))


def test_multiview_data_source_trains(scenes: Path, tmp_path: Path) -> None:
    spec = DataSpec.parse(f"multiview:{scenes}@2")
    assert (spec.kind, spec.path, spec.weight) == ("multiview", scenes, 2.0)
    out = tmp_path / "run"
    cfg = TrainConfig(
        method="hardnet",
        data=[f"multiview:{scenes / 'corner-a'}"],
        out_dir=out,
        steps=2,
        batch_size=16,
        images_per_batch=2,
        val="none",
        mr_size=6.0,
        augment=False,
    )
    path = train(cfg)
    assert path.is_file()
    pools = list((out / "pools").iterdir())
    assert len(pools) == 1 and is_pool(pools[0]) and pools[0].name.startswith("multiview-")
    meta = json.loads((pools[0] / "meta.json").read_text())
    assert meta["patch_size"] == 32 and meta["mr_size"] == 6.0
    # A built pool given as the source is used as it is.
    cfg2 = TrainConfig(
        method="hardnet",
        data=[f"multiview:{pools[0]}"],
        out_dir=tmp_path / "r2",
        steps=1,
        batch_size=16,
        val="none",
        mr_size=6.0,
    )
    assert train(cfg2).is_file()
    assert not (tmp_path / "r2" / "pools").exists()


def test_multiview_patches_in_refined_frames(scenes: Path, tmp_path: Path) -> None:
    import math

    import torch

    from descmatch.nets import FrameNet
    from descmatch.weights import save_checkpoint, sha256

    conf = TrackConfig(max_keypoints=1500, pair_window=3, window=6.0)
    tr = scene_tracks(scenes / "corner-a", conf)
    rows = np.arange(0, len(tr.obs_image), 7)
    net = FrameNet().eval()  # rescales every keypoint by 1.25
    torch.nn.init.constant_(net.head.bias, math.atanh(math.log(1.25) / math.log(1.8)))
    got = cut_patches(tr, rows, 32, 6.0, 1.0, frames=net)
    tr.obs_size = tr.obs_size * np.float32(1.25)
    np.testing.assert_array_equal(got, cut_patches(tr, rows, 32, 6.0, 1.0))
    # A pool built with a refiner records it (and is another pool than one without).
    f = save_checkpoint(tmp_path / "f.pt", net, {"mr_size": 10.0})
    out = build_multiview_pool(scenes / "corner-b", tmp_path / "pool", frames=str(f), **TINY)
    assert json.loads((out / "meta.json").read_text())["frames_sha256"] == sha256(f)
