"""Files made by descmatch, read back the way hloc reads them (hloc.utils.io and
hloc.utils.parsers, reimplemented here with h5py: hloc is not a dependency): image names
listed from the datasets' parents, keypoints, transposed descriptors (D,N), image_size,
pair keys with '/' -> '-', matches0 int32 with -1 for unmatched, reverse-pair lookup."""

from __future__ import annotations

from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from conftest import write_scenes

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.extract import extract
from descmatch.images import list_images
from descmatch.match import match
from descmatch.pairs import exhaustive


# -- hloc's readers (hloc/utils/io.py, hloc/utils/parsers.py) --------------------------------
def names_to_pair(name0: str, name1: str, separator: str = "/") -> str:
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def list_h5_names(path: Path) -> list[str]:
    names = []
    with h5py.File(str(path), "r", libver="latest") as fd:

        def visit_fn(_: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                names.append(obj.parent.name.strip("/"))

        fd.visititems(visit_fn)
    return list(set(names))


def get_keypoints(path: Path, name: str) -> np.ndarray:
    with h5py.File(str(path), "r", libver="latest") as hfile:
        return hfile[name]["keypoints"].__array__()


def find_pair(hfile: h5py.File, name0: str, name1: str) -> tuple[str, bool]:
    pair = names_to_pair(name0, name1)
    if pair in hfile:
        return pair, False
    pair = names_to_pair(name1, name0)
    if pair in hfile:
        return pair, True
    raise ValueError(f"Could not find pair {(name0, name1)}")


def get_matches(path: Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(str(path), "r", libver="latest") as hfile:
        pair, reverse = find_pair(hfile, name0, name1)
        matches = hfile[pair]["matches0"].__array__()
        scores = hfile[pair]["matching_scores0"].__array__()
    idx = np.where(matches != -1)[0]
    matches = np.stack([idx, matches[idx]], -1)
    if reverse:
        matches = np.flip(matches, -1)
    return matches, scores[idx]


# -- the test ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, list[str]]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hloc")
    imgs = root / "imgs"
    write_scenes(imgs / "sub", 2, first_seed=3)  # names with a '/': sub/img0.png
    write_scenes(imgs, 1, first_seed=3)  # img0.png: the same picture as sub/img0.png
    images = list_images(imgs)
    feats, matches = root / "features.h5", root / "matches.h5"
    extract(images, feats, build_describer("rootsift"), SiftDetector(max_keypoints=300))
    match(feats, exhaustive(images.names), matches)
    return imgs, feats, matches, images.names


def test_hloc_reads_our_features(files: tuple[Path, Path, Path, list[str]]) -> None:
    imgs, feats, _, names = files
    assert (
        sorted(list_h5_names(feats))
        == sorted(names)
        == ["img0.png", "sub/img0.png", "sub/img1.png"]
    )
    with h5py.File(feats, "r") as f:
        for n in names:
            g = f[n]
            kp = get_keypoints(feats, n)
            assert kp.dtype == np.float32 and kp.ndim == 2 and kp.shape[1] == 2
            desc = g["descriptors"].__array__()
            assert desc.shape == (128, len(kp))  # hloc stores descriptors transposed
            np.testing.assert_allclose(np.linalg.norm(desc, axis=0), 1.0, atol=1e-4)
            h, w = cv2.imread(str(imgs / n), cv2.IMREAD_GRAYSCALE).shape
            assert g["image_size"].__array__().tolist() == [w, h]
            assert np.all((kp >= -0.5) & (kp < [w - 0.5, h - 0.5]))


def test_hloc_reads_our_matches(files: tuple[Path, Path, Path, list[str]]) -> None:
    _, feats, matches, names = files
    with h5py.File(matches, "r") as f:
        keys = []
        f.visititems(
            lambda k, o: keys.append(k) if isinstance(o, h5py.Group) and "matches0" in o else None
        )
        assert sorted(keys) == sorted(names_to_pair(a, b) for a, b in exhaustive(names))
        assert "sub-img0.png/sub-img1.png" in keys
        for k in keys:
            m0 = f[k]["matches0"]
            assert m0.dtype == np.int32 and f[k]["matching_scores0"].dtype == np.float32
    unmatched = 0
    for a, b in exhaustive(names):
        fwd, s_fwd = get_matches(matches, a, b)
        rev, s_rev = get_matches(matches, b, a)  # hloc's reverse-pair lookup
        np.testing.assert_array_equal(rev, fwd[:, ::-1])
        np.testing.assert_array_equal(s_rev, s_fwd)
        n0, n1 = len(get_keypoints(feats, a)), len(get_keypoints(feats, b))
        assert fwd[:, 0].max() < n0 and fwd[:, 1].max() < n1 and fwd.min() >= 0
        assert len(np.unique(fwd[:, 1])) == len(fwd)  # mutual: one-to-one
        with h5py.File(matches, "r") as f:
            raw = f[find_pair(f, a, b)[0]]["matches0"].__array__()
        assert len(raw) == n0 and raw.min() >= -1
        assert int((raw == -1).sum()) == n0 - len(fwd)  # -1 marks the unmatched
        unmatched += int((raw == -1).sum())
    assert unmatched > 0
    # The two copies of one picture match far better than different pictures.
    same, _ = get_matches(matches, "img0.png", "sub/img0.png")
    other, _ = get_matches(matches, "sub/img0.png", "sub/img1.png")
    assert len(same) > 5 * max(1, len(other))
