"""The hpatches data kind: detected keypoints paired under the true homography, a pool grouped
by image pair, cached under the run folder, and a training run on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from descmatch.detect import SiftDetector
from descmatch.errors import InputError
from descmatch.evaluate import read_homography
from descmatch.examples import make_views
from descmatch.images import read_image
from descmatch.train.descriptors import DataSpec, TrainConfig, train
from descmatch.train.hpatches import (
    build_hpatches_pool_for,
    detect,
    find_sequences,
    homography_pairs,
)
from descmatch.train.photos import PhotoPairConfig, map_keypoints
from descmatch.train.pool import PairPool
from descmatch.weights import load_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny work: one thread is as fast


def write_sequence(folder: Path, seed: int = 3, width: int = 320, height: int = 240) -> Path:
    """An HPatches-style sequence from the example views: 1.jpg, 2.jpg, 3.jpg, H_1_2, H_1_3."""
    folder.mkdir(parents=True, exist_ok=True)
    views, hs = make_views(width, height, seed)
    for i, v in enumerate(views, 1):
        assert cv2.imwrite(str(folder / f"{i}.jpg"), v, [cv2.IMWRITE_JPEG_QUALITY, 95])
    for i, h in enumerate(hs, 2):
        np.savetxt(folder / f"H_1_{i}", h)
    return folder


@pytest.fixture(scope="module")
def seqs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two sequences (seq_a, seq_b)."""
    root = tmp_path_factory.mktemp("hpatches")
    write_sequence(root / "seq_a", seed=3)
    write_sequence(root / "seq_b", seed=4)
    return root


def test_pairs_agree_with_the_homography(seqs: Path) -> None:
    seq = seqs / "seq_a"
    conf = PhotoPairConfig()
    det = SiftDetector(max_keypoints=conf.max_keypoints)
    im1, im2 = read_image(seq / "1.jpg"), read_image(seq / "2.jpg")
    k1, k2 = detect(im1, det), detect(im2, det)
    h = read_homography(seq / "H_1_2")
    hp = homography_pairs(k1, im1.shape, k2, im2.shape, h, np.random.default_rng(0), conf)
    assert len(hp) >= 50
    assert len(set(hp.idx1.tolist())) == len(hp) == len(set(hp.idx_i.tolist()))
    m_xy, m_size, _, _ = map_keypoints(h, k1.xy[hp.idx1], k1.size[hp.idx1], k1.angle[hp.idx1])
    assert np.linalg.norm(m_xy - k2.xy[hp.idx_i], axis=1).max() <= 2.0 + 1e-5
    ratio = m_size / k2.size[hp.idx_i]
    assert (np.maximum(ratio, 1 / ratio) <= 1.2 + 1e-5).all()
    capped = homography_pairs(
        k1, im1.shape, k2, im2.shape, h, np.random.default_rng(0), conf, max_pairs=20
    )
    assert len(capped) == 20 and set(capped.idx1.tolist()) <= set(hp.idx1.tolist())


def test_pool_groups_pairs_by_image_pair_and_is_cached(seqs: Path, tmp_path: Path) -> None:
    out = build_hpatches_pool_for(seqs / "seq_a", tmp_path, 32, 6.0, 1.0, 200, 0)
    pool = PairPool.load(out)
    meta = pool.meta
    assert meta["kind"] == "hpatches" and meta["images"] == ["seq_a/1-2", "seq_a/1-3"]
    sizes = np.diff(pool.group_offsets)
    assert pool.num_groups == 2 and (sizes >= 30).all() and (sizes <= 200).all()
    # Matching patches look alike, more than patches of different points do.
    x = pool.gather(np.arange(pool.num_points)).astype(np.float32)
    same = np.abs(x[:, 0] - x[:, 1]).mean()
    other = np.abs(x[:, 0] - np.roll(x[:, 1], 7, axis=0)).mean()
    assert same < 0.6 * other
    # Built once: a second call reuses it.
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert build_hpatches_pool_for(seqs / "seq_a", tmp_path, 32, 6.0, 1.0, 200, 0) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    # A folder of sequences: every image pair of each.
    both = PairPool.load(build_hpatches_pool_for(seqs, tmp_path, 32, 6.0, 1.0, 100, 0))
    assert both.meta["images"] == ["seq_a/1-2", "seq_a/1-3", "seq_b/1-2", "seq_b/1-3"]
    assert both.meta["sequences"] == ["seq_a", "seq_b"]


def test_not_a_sequence(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        find_sequences(tmp_path)
    with pytest.raises(InputError):
        find_sequences(tmp_path / "missing")


def test_train_on_hpatches(seqs: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    shutil.copytree(seqs / "seq_b", one)
    assert DataSpec.parse(f"hpatches:{one}@2") == DataSpec("hpatches", one, 2.0)
    cfg = TrainConfig(
        method="l2net",
        data=[f"hpatches:{one}"],
        out_dir=tmp_path / "run",
        steps=2,
        batch_size=16,
        pairs_per_image=64,
        val_pairs=40,
    )
    path = train(cfg)
    built = list((tmp_path / "run" / "pools").glob("hpatches-one-32px-*"))
    assert len(built) == 1
    meta = json.loads((built[0] / "meta.json").read_text())
    assert meta["pairs_per_image"] == 64 and len(meta["images"]) == 2
    loaded = load_net("l2net", path).meta
    assert loaded["steps"] == 2 and "hpatches:" in loaded["data"]
    assert 0.0 <= loaded["val_fpr95"] <= 1.0  # one image pair held out for validation
