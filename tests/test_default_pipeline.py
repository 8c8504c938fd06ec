"""The shipped default, end to end: `descmatch extract` and `descmatch match` with no method
options use the real shipped weights (the net named in weights/DEFAULT, the frame refiner and
size pooling), and the matches agree with the example views' true homographies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from descmatch.evaluate import project, read_homography
from descmatch.h5 import Reader, read_features, read_matches
from descmatch.weights import default_method, sha256

REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
KEYPOINTS = 300


@pytest.fixture(autouse=True)
def shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCMATCH_WEIGHTS", str(REPO_WEIGHTS))


@pytest.fixture(scope="module")
def default_files(example_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """extract + match with the defaults (only the keypoint budget lowered for speed)."""
    from descmatch.cli import main

    mp = pytest.MonkeyPatch()
    mp.setenv("DESCMATCH_WEIGHTS", str(REPO_WEIGHTS))
    out = tmp_path_factory.mktemp("default")
    feats, matches = out / "features.h5", out / "matches.h5"
    try:
        for argv in (
            ["extract", str(example_dir), str(feats), "--max-keypoints", str(KEYPOINTS)],
            ["match", str(feats), str(matches)],
        ):
            mp.setattr("sys.argv", ["descmatch", "-q", *argv])
            try:
                main()
            except SystemExit as e:  # main() exits only on an error
                raise AssertionError(f"{argv}: exit {e.code}") from None
    finally:
        mp.undo()
    return feats, matches


def test_the_default_is_the_shipped_pipeline(default_files: tuple[Path, Path]) -> None:
    feats, _ = default_files
    method = default_method()
    assert method is not None, "weights/DEFAULT names no shipped net"
    with Reader(feats, "features") as r:
        attrs = dict(r.attrs)
    settings = json.loads(attrs["settings"])
    assert attrs["method"] == method
    assert attrs["weights_sha256"] == sha256(REPO_WEIGHTS / f"{method}.pt")
    assert settings["frames_sha256"] == sha256(REPO_WEIGHTS / "frames.pt")
    assert settings["size_pool"] == [0.7, 1.4]


@pytest.mark.parametrize("view,hfile", [("view2.jpg", "H_1_2"), ("view3.jpg", "H_1_3")])
def test_default_matches_agree_with_the_true_homography(
    example_dir: Path, default_files: tuple[Path, Path], view: str, hfile: str
) -> None:
    feats, matches = default_files
    m, _ = read_matches(matches, "view1.jpg", view)
    k0 = read_features(feats, "view1.jpg")["keypoints"]
    k1 = read_features(feats, view)["keypoints"]
    i0 = np.nonzero(m >= 0)[0]
    err = np.linalg.norm(project(read_homography(example_dir / hfile), k0[i0]) - k1[m[i0]], axis=1)
    assert len(i0) >= 0.3 * KEYPOINTS
    assert (err <= 3).mean() >= 0.85
