"""`descmatch eval homography` and `eval epipolar` on data the tests make."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_train_multiview import make_scene
from typer.testing import CliRunner

from descmatch.cli import app
from descmatch.describe import SiftDescriber
from descmatch.detect import SiftDetector
from descmatch.evaluate import evaluate_epipolar, evaluate_homography
from descmatch.examples import copy_examples

runner = CliRunner()


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped example views laid out as an HPatches sequence (1.jpg, 2.jpg, H_1_2...)."""
    src = tmp_path_factory.mktemp("ex")
    copy_examples(src)
    seq = tmp_path_factory.mktemp("seq") / "v_synthetic"
    seq.mkdir()
    for i in (1, 2, 3):
        shutil.copyfile(src / f"view{i}.jpg", seq / f"{i}.jpg")
    for i in (2, 3):
        shutil.copyfile(src / f"H_1_{i}", seq / f"H_1_{i}")
    return seq


def test_homography_eval_scores_against_the_truth(sequence: Path) -> None:
    rows = evaluate_homography(sequence, SiftDescriber(root=True), SiftDetector(500))
    assert [r.pair for r in rows] == ["1-2", "1-3"]
    for r in rows:
        assert r.matches > 100
        assert r.mma(3) > 0.8
        assert r.correct[1] <= r.correct[3] <= r.correct[10] <= r.matches
        assert r.corner_error < 3.0
        assert r.correct[3] <= r.possible <= 500  # mutual matches are one-to-one
        assert 0.5 * r.possible < r.framed <= r.possible  # a small viewpoint change


def test_homography_eval_detects_a_wrong_homography(sequence: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(sequence, bad)
    h = np.loadtxt(bad / "H_1_2")
    np.savetxt(bad / "H_1_2", np.array([[1, 0, 25.0], [0, 1, 0], [0, 0, 1]]) @ h)
    good = evaluate_homography(sequence, SiftDescriber(root=True), SiftDetector(500))[0]
    wrong = evaluate_homography(bad, SiftDescriber(root=True), SiftDetector(500))[0]
    assert wrong.correct[3] < 0.05 * good.correct[3]


def test_eval_homography_cli_writes_json(sequence: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.json"
    res = runner.invoke(
        app,
        [
            "eval",
            "homography",
            str(sequence),
            "--method",
            "rootsift",
            "--max-keypoints",
            "400",
            "--json",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "MMA@3" in res.output
    data = json.loads(out.read_text())
    assert data["method"] == "rootsift" and len(data["rows"]) == 2
    assert "possible@3" in res.output and data["rows"][0]["possible@3"] > 0
    assert (
        "framed@3" in res.output
        and 0 < data["rows"][0]["framed@3"] <= data["rows"][0]["possible@3"]
    )


def brute_force_matching(ok: np.ndarray) -> int:
    """The largest set of (i, j) pairs with ok[i, j], no i or j twice, by trying all."""
    import itertools

    n0, n1 = ok.shape
    best = 0
    for perm in itertools.permutations(range(max(n0, n1)), n0):
        best = max(best, sum(1 for i, j in enumerate(perm) if j < n1 and ok[i, j]))
    return best


def test_possible_correspondences_is_a_maximum_one_to_one_matching() -> None:
    from descmatch.evaluate import possible_correspondences

    rng = np.random.default_rng(1)
    shift = np.array([[1, 0, 0.5], [0, 1, -0.25], [0, 0, 1]])
    for _ in range(60):
        a = rng.uniform(0, 6, (int(rng.integers(0, 6)), 2))
        b = rng.uniform(0, 6, (int(rng.integers(0, 6)), 2))
        pa = a + [0.5, -0.25]
        ok = (
            np.linalg.norm(pa[:, None] - b[None], axis=2) <= 1.5
            if len(a) and len(b)
            else np.zeros((len(a), len(b)), bool)
        )
        assert possible_correspondences(a, b, shift, 1.5) == brute_force_matching(ok)
    # With frames: an edge also needs the orientations within 30 degrees (as gradients map;
    # under the shift they stay) and the sizes within 1.5x.
    for _ in range(60):
        a = rng.uniform(0, 6, (int(rng.integers(1, 6)), 2))
        b = rng.uniform(0, 6, (int(rng.integers(1, 6)), 2))
        sa, sb = rng.uniform(1, 3, len(a)), rng.uniform(1, 3, len(b))
        ta, tb = rng.uniform(0, 360, len(a)), rng.uniform(0, 360, len(b))
        near = np.linalg.norm(a[:, None] + [0.5, -0.25] - b[None], axis=2) <= 1.5
        dang = np.abs((tb[None] - ta[:, None] + 180) % 360 - 180)
        same = (dang <= 30) & (np.abs(np.log(sb[None] / sa[:, None])) <= np.log(1.5))
        assert possible_correspondences(a, b, shift, 1.5, (sa, ta, sb, tb)) == brute_force_matching(
            near & same
        )
    # A greedy nearest choice would take (0 -> 0) and leave point 1 without a partner.
    a = np.array([[0.0, 0.0], [2.0, 0.0]])
    b = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert possible_correspondences(a, b, np.eye(3), 1.0) == 2


def test_epipolar_eval_on_a_rendered_scene(tmp_path: Path) -> None:
    scene = tmp_path / "scene"
    make_scene(scene, num_views=3)
    rows = evaluate_epipolar(scene, SiftDescriber(root=True), SiftDetector(800))
    assert len(rows) == 2
    for r in rows:
        assert r.matches > 50
        assert r.correct > 0.7 * r.matches
    res = runner.invoke(
        app, ["eval", "epipolar", str(scene), "--method", "rootsift", "--max-keypoints", "400"]
    )
    assert res.exit_code == 0, res.output
    assert "precision" in res.output
