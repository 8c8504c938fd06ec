"""``descmatch sfm``: a rendered multi-view scene reconstructs with every camera registered
and sub-pixel reprojection error, stages resume from their files, a scene that cannot
register fails clearly with its partial outputs kept; and the relative pose metric."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures_sfm import make_scene

from descmatch import cli
from descmatch.cameras import read_cameras
from descmatch.errors import ReconstructionError
from descmatch.evaluate import relative_pose_errors, summarize_pose_errors

pycolmap = pytest.importorskip("pycolmap")

VIEWS = 6
OUTPUTS = ("features.h5", "pairs.txt", "matches.h5", "database.db")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A room corner (two walls and a floor) rendered by 6 known cameras, 400x300."""
    root = tmp_path_factory.mktemp("sfm-room")
    make_scene(root, VIEWS, seed=0)
    return root


SFM = ("--method", "rootsift", "--max-keypoints", "1500", "--threads", "1")


def _stage(out: str, name: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith(name + " ")]
    return line


def test_sfm_reconstructs_the_rendered_scene(
    room: Path, tmp_path: Path, call_main: Callable[..., tuple[int, str, str]]
) -> None:
    out_dir = tmp_path / "out"
    code, out, err = call_main(
        "sfm", str(room / "images"), str(out_dir), *SFM, "--cameras", str(room / "cameras.txt")
    )
    assert code == 0, err
    for stage in ("extract", "pairs", "match", "export", "mapping"):
        assert re.search(r"\d+\.\d s", _stage(out, stage)), out
    m = re.search(
        r"(\d+)/(\d+) images registered, ([\d,]+) 3D points, mean track length "
        r"([\d.]+), mean reprojection error ([\d.]+) px",
        out,
    )
    assert m, out
    assert int(m[1]) == int(m[2]) == VIEWS
    assert int(m[3].replace(",", "")) > 300 and float(m[4]) > 2.5 and float(m[5]) < 1.0
    for f in OUTPUTS:
        assert (out_dir / f).is_file()

    # The model on disk (COLMAP binary) says the same, and its poses match the truth.
    rec = pycolmap.Reconstruction(str(out_dir / "sparse" / "0"))
    assert rec.num_reg_images() == VIEWS
    assert rec.compute_mean_reprojection_error() < 1.0
    p = re.search(r"rotation median ([\d.]+) deg.*translation direction median ([\d.]+) deg", out)
    assert p and float(p[1]) < 0.5 and float(p[2]) < 1.0, out
    assert f"15 pairs of {VIEWS}/{VIEWS} cameras" in out

    # Run again: every stage is done already, nothing is rebuilt.
    mtime = (out_dir / "database.db").stat().st_mtime_ns
    code, out, err = call_main("sfm", str(room / "images"), str(out_dir), *SFM)
    assert code == 0, err
    for stage in ("extract", "pairs", "match", "export", "mapping"):
        assert "(done before)" in _stage(out, stage), out
    assert (out_dir / "database.db").stat().st_mtime_ns == mtime
    assert f"{VIEWS}/{VIEWS} images registered" in out

    # Other pairs: the pairs change; their matches exist already, the rest is rebuilt.
    code, out, err = call_main(
        "sfm", str(room / "images"), str(out_dir), *SFM, "--pairs", "retrieval:3"
    )
    assert code == 0, err
    assert "(done before)" in _stage(out, "extract") and "(done before)" in _stage(out, "match")
    assert "retrieval:3" in _stage(out, "pairs") and "(done before)" not in _stage(out, "export")
    assert (out_dir / "pairs.txt").read_text().startswith("# descmatch pairs retrieval:3")
    assert f"{VIEWS}/{VIEWS} images registered" in out

    # Another camera mode: only the database and the model are made again.
    code, out, err = call_main(
        "sfm",
        str(room / "images"),
        str(out_dir),
        *SFM,
        "--pairs",
        "retrieval:3",
        "--camera-mode",
        "per-image",
    )
    assert code == 0, err
    assert all("(done before)" in _stage(out, s) for s in ("extract", "pairs", "match"))
    assert f"{VIEWS} camera(s)" in _stage(out, "export")
    assert f"{VIEWS}/{VIEWS} images registered" in out


def test_unregistrable_scene_fails_clearly_and_keeps_its_files(
    tmp_path: Path, call_main: Callable[..., tuple[int, str, str]]
) -> None:
    imgs = tmp_path / "noise"
    imgs.mkdir()
    for i in range(2):
        rng = np.random.default_rng(i)
        noise = cv2.GaussianBlur((rng.random((240, 320)) * 255).astype(np.uint8), (0, 0), 1.0)
        cv2.imwrite(str(imgs / f"n{i}.png"), noise)
    out_dir = tmp_path / "out"
    code, out, err = call_main("sfm", str(imgs), str(out_dir), *SFM)
    assert code == ReconstructionError.exit_code == 5
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "no model could be registered from 2 images" in err and "kept" in err
    assert "no model" in _stage(out, "mapping")
    for f in OUTPUTS:
        assert (out_dir / f).is_file(), f
    assert not (out_dir / "sparse" / "0").exists()

    # One image is not enough for structure from motion.
    one = tmp_path / "one"
    one.mkdir()
    cv2.imwrite(str(one / "a.png"), cv2.imread(str(imgs / "n0.png")))
    code, out, err = call_main("sfm", str(one), str(tmp_path / "out1"), *SFM)
    assert code == 5 and "at least 2" in err


@pytest.mark.parametrize(
    "command,expected",
    [
        (
            ["sfm"],
            [
                "exhaustive",
                "retrieval:K",
                "sequential:K+loops:N",
                "--cameras",
                "4000",
                "--camera-mode",
                "single",
                "descmatch[sfm]",
            ],
        ),
        (["pairs"], ["--pairs", "sequential:K+loops:N", "retrieval:K", "--words", "64"]),
        (
            ["export", "colmap"],
            ["--camera-mode", "--descriptors", "--no-verify", "--overwrite", "descmatch[sfm]"],
        ),
    ],
)
def test_help_of_the_sfm_commands(command: list[str], expected: list[str]) -> None:
    from typer.testing import CliRunner

    res = CliRunner().invoke(cli.app, [*command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for word in expected:
        assert word in res.output, (word, res.output)


def test_relative_pose_errors_ignore_the_world_frame(room: Path) -> None:
    cams = read_cameras(room / "cameras.txt")
    truth = {n: (c.R, c.t) for n, c in cams.items()}
    # The same cameras in another world frame and scale: X' = s Q X + d.
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    s, d = 3.7, np.array([1.0, -2.0, 0.5])
    moved = {n: (r @ q.T, s * t - r @ q.T @ d) for n, (r, t) in truth.items()}
    errs = relative_pose_errors(moved, truth)
    assert len(errs) == VIEWS * (VIEWS - 1) // 2
    assert max(e.rotation_deg for e in errs) < 1e-5
    assert max(e.translation_deg for e in errs) < 1e-5
    # Turn one camera by 2 degrees about its optical axis: its pairs are 2 degrees off.
    a = np.radians(2.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    r0, t0 = truth["v0.png"]
    bent = dict(truth, **{"v0.png": (rz @ r0, rz @ t0)})
    errs = relative_pose_errors(bent, truth)
    for e in errs:
        assert e.rotation_deg == pytest.approx(2.0 if "v0.png" in e.pair else 0.0, abs=1e-6)
    summary = summarize_pose_errors(errs, len(truth), len(bent))
    assert summary.pairs == 15 and summary.rotation_median == pytest.approx(0.0, abs=1e-6)
    assert summary.rotation_mean == pytest.approx(2.0 * 5 / 15)
    assert summary.within_5deg == 1.0
    # Only cameras present in both are compared.
    assert len(relative_pose_errors({"v0.png": truth["v0.png"]}, truth)) == 0
