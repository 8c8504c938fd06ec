"""End to end on the shipped example views: extract RootSIFT, match exhaustively, and check
the matches against the known homographies; the same in two-image mode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_KEYPOINTS
from typer.testing import CliRunner

from descmatch.cli import app
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.evaluate import homography_corner_error, project, read_homography
from descmatch.export.viz import verify
from descmatch.h5 import Reader, read_features, read_matches
from descmatch.images import read_image
from descmatch.match import match, match_descriptors
from descmatch.pairs import exhaustive

pytestmark = pytest.mark.usefixtures("no_weights")

NAMES = ["view1.jpg", "view2.jpg", "view3.jpg"]


@pytest.fixture(scope="module")
def example_matches(example_features: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "matches.h5"
    res = match(example_features, exhaustive(NAMES), out)
    assert res.matched == 3
    return out


def _errors(features: Path, matches: Path, a: str, b: str, h: np.ndarray) -> tuple[int, np.ndarray]:
    m, _ = read_matches(matches, a, b)
    k0 = read_features(features, a)["keypoints"]
    k1 = read_features(features, b)["keypoints"]
    i0 = np.nonzero(m >= 0)[0]
    err = np.linalg.norm(project(h, k0[i0]) - k1[m[i0]], axis=1)
    return len(i0), err


def test_features_of_the_examples(example_features: Path) -> None:
    with Reader(example_features, "features") as r:
        assert sorted(r.keys) == NAMES and r.attrs["method"] == "rootsift"
        for name in NAMES:
            f = r.read(name)
            assert f["keypoints"].shape == (EXAMPLE_KEYPOINTS, 2)
            assert f["descriptors"].shape == (128, EXAMPLE_KEYPOINTS)
            assert f["image_size"].tolist() == [640, 480]


@pytest.mark.parametrize(
    "view,hfile,min_matches,min_precision",
    [
        ("view2.jpg", "H_1_2", 200, 0.9),
        ("view3.jpg", "H_1_3", 200, 0.85),
    ],
)
def test_matches_agree_with_the_true_homography(
    example_dir: Path,
    example_features: Path,
    example_matches: Path,
    view: str,
    hfile: str,
    min_matches: int,
    min_precision: float,
) -> None:
    h = read_homography(example_dir / hfile)
    n, err = _errors(example_features, example_matches, "view1.jpg", view, h)
    assert n > min_matches
    assert (err <= 3).mean() >= min_precision
    # Control: the same matches against a wrong homography are mostly wrong.
    other = read_homography(example_dir / ("H_1_3" if hfile == "H_1_2" else "H_1_2"))
    _, wrong = _errors(example_features, example_matches, "view1.jpg", view, other)
    assert (wrong <= 3).mean() < 0.2


def test_the_true_homography_is_recovered(
    example_dir: Path, example_features: Path, example_matches: Path
) -> None:
    m, _ = read_matches(example_matches, "view1.jpg", "view2.jpg")
    i0 = np.nonzero(m >= 0)[0]
    k0 = read_features(example_features, "view1.jpg")["keypoints"]
    k1 = read_features(example_features, "view2.jpg")["keypoints"]
    h_est, inliers = verify(k0[i0], k1[m[i0]], "homography")
    assert h_est is not None and inliers.mean() > 0.85
    h_true = read_homography(example_dir / "H_1_2")
    assert homography_corner_error(h_est, h_true, 640, 480) < 2.0


def test_view2_to_view3_is_consistent(
    example_dir: Path, example_features: Path, example_matches: Path
) -> None:
    """Pair 2-3 has no file of its own: H_2_3 = H_1_3 @ inv(H_1_2)."""
    h23 = read_homography(example_dir / "H_1_3") @ np.linalg.inv(
        read_homography(example_dir / "H_1_2")
    )
    n, err = _errors(example_features, example_matches, "view2.jpg", "view3.jpg", h23)
    assert n > 150 and (err <= 3).mean() > 0.85


def test_upright_matches_worse_under_rotation(example_dir: Path) -> None:
    """view3 is rotated by 25 degrees: orientation matters, so --upright loses matches."""
    h = read_homography(example_dir / "H_1_3")
    counts = {}
    for upright in (False, True):
        det = SiftDetector(max_keypoints=500, upright=upright)
        desc = build_describer("rootsift")
        feats = []
        for name in ("view1.jpg", "view3.jpg"):
            img = read_image(example_dir / name)
            kps = det(img)
            feats.append((kps, torch.from_numpy(desc(img, kps))))
        (k0, d0), (k1, d1) = feats
        m = match_descriptors(d0, d1)[0].numpy()
        i0 = np.nonzero(m >= 0)[0]
        err = np.linalg.norm(project(h, k0.xy[i0]) - k1.xy[m[i0]], axis=1)
        counts[upright] = int((err <= 3).sum())
    assert counts[False] > 100
    assert counts[True] < 0.7 * counts[False]


def test_two_image_mode_inliers(example_dir: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "match",
            str(example_dir / "view1.jpg"),
            str(example_dir / "view3.jpg"),
            "--geometry",
            "homography",
            "--max-keypoints",
            str(EXAMPLE_KEYPOINTS),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "rootsift" in res.output  # auto without shipped weights
    found = re.search(r"(\d+) matches, (\d+) inliers \(homography\)", res.output)
    assert found, res.output
    matches, inliers = int(found.group(1)), int(found.group(2))
    assert matches > 200 and inliers >= 0.85 * matches


def test_names_with_spaces_round_trip(example_dir: Path, tmp_path: Path) -> None:
    """Image names with spaces survive features.h5, the pairs file `match` writes, and a
    second `match` that reads it back; an untabbed hloc-style line splits at known names."""
    imgs = tmp_path / "my images"
    imgs.mkdir()
    for src, dst in (
        ("view1.jpg", "IMG 001.jpg"),
        ("view2.jpg", "IMG 002.jpg"),
        ("view3.jpg", "plain.jpg"),
    ):
        (imgs / dst).write_bytes((example_dir / src).read_bytes())
    runner = CliRunner()
    feats, pairs, m1, m2 = (tmp_path / n for n in ("f.h5", "pairs.txt", "m1.h5", "m2.h5"))
    res = runner.invoke(
        app, ["extract", str(imgs), str(feats), "-m", "rootsift", "--max-keypoints", "300"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["match", str(feats), str(m1), "--pairs-out", str(pairs)])
    assert res.exit_code == 0, res.output
    lines = pairs.read_text().splitlines()
    assert "IMG 001.jpg\tIMG 002.jpg" in lines and "IMG 001.jpg\tplain.jpg" in lines
    res = runner.invoke(app, ["match", str(feats), str(m2), "--pairs", str(pairs)])
    assert res.exit_code == 0, res.output
    a, _ = read_matches(m1, "IMG 001.jpg", "IMG 002.jpg")
    b, _ = read_matches(m2, "IMG 001.jpg", "IMG 002.jpg")
    assert (a >= 0).sum() > 100 and np.array_equal(a, b)

    hloc = tmp_path / "hloc.txt"
    hloc.write_text("IMG 002.jpg plain.jpg\nplain.jpg IMG 001.jpg\n")
    res = runner.invoke(app, ["match", str(feats), str(m2), "--pairs", str(hloc)])
    assert res.exit_code == 0, res.output
    assert (read_matches(m2, "IMG 002.jpg", "plain.jpg")[0] >= 0).sum() > 50
    hloc.write_text("IMG 002.jpg other.jpg\n")
    res = runner.invoke(app, ["match", str(feats), str(m2), "--pairs", str(hloc)])
    assert res.exit_code != 0 and "hloc.txt:1: 'IMG 002.jpg other.jpg' is not two" in str(
        res.exception
    )
