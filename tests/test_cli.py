"""The command line: help and defaults, the commands end to end, and errors as one line on
stderr with the documented exit codes (2 input, 3 output, 4 weights, 130 interrupted)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import MainResult, run_cli, write_scenes
from typer.testing import CliRunner

from descmatch import __version__
from descmatch.cli import app
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import DescmatchError, InputError
from descmatch.extract import extract
from descmatch.h5 import Reader, pair_key, read_matches
from descmatch.images import list_images
from descmatch.match import DEFAULT_RATIO
from descmatch.patches import DEFAULT_MR_SIZE

pytestmark = pytest.mark.usefixtures("no_weights")

runner = CliRunner()


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


# -- help and defaults -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "command,expected",
    [
        ("detect", ["--max-keypoints", "4000", "--resize-max", "--upright"]),
        (
            "extract",
            [
                "--method",
                "rootsift",
                "hardnet",
                "4000",
                "256",
                "2048",
                "--weights",
                "--half",
                f"{DEFAULT_MR_SIZE:g}",
            ],
        ),
        (
            "match",
            [
                "--ratio",
                f"{DEFAULT_RATIO:g}",
                "4000",
                "exhaustive",
                "sequential:K",
                "--viz",
                "fundamental",
            ],
        ),
        ("weights", ["shipped weights"]),
        ("examples", ["example images"]),
    ],
)
def test_help_of_each_command_shows_its_defaults(command: str, expected: list[str]) -> None:
    res = runner.invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    for text in expected:
        assert text in res.output, (command, text)
    short = runner.invoke(app, [command, "-h"])
    assert short.exit_code == 0 and short.output == res.output


def test_top_level_help() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("detect", "extract", "match", "weights", "examples"):
        assert command in res.output
    for option in ("--quiet", "--verbose", "--version"):
        assert option in res.output


def test_version() -> None:
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_help_through_the_entry_point(call_main: Callable[..., MainResult]) -> None:
    code, out, err = call_main("match", "--help")
    assert code == 0 and f"{DEFAULT_RATIO:g}" in out and err == ""


def test_usage_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    for args in (["extract", "only-one-argument"], ["match", "a.h5", "b.h5", "--ratio", "1.5"], []):
        proc = run_cli(*args, cwd=tmp_path)
        assert "Traceback" not in proc.stderr, args
        assert proc.returncode == 2, args
        assert "Usage" in proc.stdout + proc.stderr, args


# -- commands --------------------------------------------------------------------------------
def test_examples_command(tmp_path: Path) -> None:
    res = runner.invoke(app, ["examples", str(tmp_path / "ex")])
    assert res.exit_code == 0, res.output
    assert str(tmp_path / "ex") in res.output and "example images" in res.output
    names = sorted(p.name for p in (tmp_path / "ex").iterdir())
    assert names == ["H_1_2", "H_1_3", "view1.jpg", "view2.jpg", "view3.jpg"]
    assert np.loadtxt(tmp_path / "ex" / "H_1_2").shape == (3, 3)
    assert cv2.imread(str(tmp_path / "ex" / "view2.jpg")).shape[:2] == (480, 640)


def test_extract_then_match_sequential(example_copy: Path, tmp_path: Path) -> None:
    feats, matches = tmp_path / "features.h5", tmp_path / "matches.h5"
    res = runner.invoke(
        app, ["extract", str(example_copy), str(feats), "-m", "rootsift", "--max-keypoints", "500"]
    )
    assert res.exit_code == 0, res.output
    assert "3 image(s)" in res.output and "500 keypoints/image" in res.output
    with Reader(feats, "features") as r:
        assert sorted(r.keys) == ["view1.jpg", "view2.jpg", "view3.jpg"]
        assert r.attrs["method"] == "rootsift"
    res = runner.invoke(app, ["match", str(feats), str(matches), "--pairs", "sequential:1"])
    assert res.exit_code == 0, res.output
    assert "2 pair(s) matched" in res.output
    pairs_file = tmp_path / "matches-pairs.txt"
    assert pairs_file.read_text() == "view1.jpg view2.jpg\nview2.jpg view3.jpg\n"
    with Reader(matches, "matches") as r:
        assert sorted(r.keys) == [
            pair_key("view1.jpg", "view2.jpg"),
            pair_key("view2.jpg", "view3.jpg"),
        ]
        assert r.settings == {"ratio": DEFAULT_RATIO, "mutual": True}
    m, _ = read_matches(matches, "view1.jpg", "view2.jpg")
    assert (m >= 0).sum() > 100
    # Again: nothing to do. Then the remaining pair, without the ratio test into a new file.
    res = runner.invoke(app, ["match", str(feats), str(matches), "--pairs", "sequential:1"])
    assert (
        res.exit_code == 0 and "0 pair(s) matched" in res.output and "2 already done" in res.output
    )
    res = runner.invoke(
        app,
        [
            "match",
            str(feats),
            str(tmp_path / "m2.h5"),
            "--ratio",
            "1",
            "--no-mutual",
            "--pairs-out",
            str(tmp_path / "p.txt"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.txt").read_text().splitlines()) == 3
    with Reader(tmp_path / "m2.h5", "matches") as r:
        assert r.settings == {"ratio": None, "mutual": False}
    m2, _ = read_matches(tmp_path / "m2.h5", "view1.jpg", "view2.jpg")
    assert (m2 >= 0).all()  # no ratio, no mutual: every keypoint has a nearest neighbour
    # Extracting again skips everything.
    res = runner.invoke(
        app, ["extract", str(example_copy), str(feats), "-m", "rootsift", "--max-keypoints", "500"]
    )
    assert res.exit_code == 0 and "3 already done" in res.output


def test_quiet_prints_nothing(example_copy: Path, tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        [
            "--quiet",
            "detect",
            str(example_copy / "view1.jpg"),
            str(tmp_path / "kp.h5"),
            "--max-keypoints",
            "100",
        ],
    )
    assert res.exit_code == 0 and res.output == ""
    with Reader(tmp_path / "kp.h5", "features") as r:
        assert r.keys == ["view1.jpg"] and r.attrs["method"] == "none"


def test_pairs_file_naming_an_unknown_image(example_features: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("view1.jpg view2.jpg\nview1.jpg ghost.jpg\n")
    res = runner.invoke(
        app, ["match", str(example_features), str(tmp_path / "m.h5"), "--pairs", str(pairs)]
    )
    assert res.exit_code != 0
    assert isinstance(res.exception, InputError)
    assert str(pairs) in str(res.exception) and "ghost.jpg" in str(res.exception)
    assert not (tmp_path / "m.h5").exists()


def test_pairs_file_through_the_entry_point(example_features: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# comment\nview3.jpg view1.jpg\n\nview1.jpg view3.jpg\n")
    proc = run_cli("match", str(example_features), str(tmp_path / "m.h5"), "--pairs", str(pairs))
    assert proc.returncode == 0, proc.stderr
    with Reader(tmp_path / "m.h5", "matches") as r:
        assert r.keys == [pair_key("view3.jpg", "view1.jpg")]  # the duplicate is dropped
    pairs.write_text("view1.jpg ghost.jpg\n")
    proc = run_cli("match", str(example_features), str(tmp_path / "m.h5"), "--pairs", str(pairs))
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert str(pairs) in line and "ghost.jpg" in line


def test_two_image_mode_with_picture(example_dir: Path, tmp_path: Path) -> None:
    viz = tmp_path / "matches.png"
    res = runner.invoke(
        app,
        [
            "match",
            str(example_dir / "view1.jpg"),
            str(example_dir / "view2.jpg"),
            "--viz",
            str(viz),
            "-m",
            "rootsift",
            "--max-keypoints",
            "1000",
        ],
    )
    assert res.exit_code == 0, res.output
    found = re.search(r"(\d+) matches, (\d+) inliers", res.output)
    assert found, res.output
    n_matches, n_inliers = int(found.group(1)), int(found.group(2))
    assert n_matches > 200 and n_inliers > 0.8 * n_matches
    assert "1000 keypoints" in res.output and f"wrote {viz}" in res.output
    assert viz.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = cv2.imread(str(viz))
    assert picture.shape == (480, 1280, 3)
    assert (picture[..., 1].astype(int) - picture[..., 0] > 80).sum() > 100  # green lines


def test_viz_needs_two_images(example_features: Path, tmp_path: Path) -> None:
    res = runner.invoke(
        app,
        ["match", str(example_features), str(tmp_path / "m.h5"), "--viz", str(tmp_path / "v.png")],
    )
    assert res.exit_code != 0 and isinstance(res.exception, DescmatchError)
    assert "two-image" in str(res.exception)


def test_weights_command(no_weights: Path, hardnet_ckpt: Path) -> None:
    res = runner.invoke(app, ["weights"])
    assert res.exit_code == 0
    assert "no trained weights" in res.output and "rootsift" in res.output
    ckpt = torch.load(hardnet_ckpt, weights_only=True)
    ckpt["meta"] = {"data": "liberty", "headline": "FPR95 1.5%"}
    torch.save(ckpt, no_weights / "hardnet.pt")
    (no_weights / "DEFAULT").write_text("hardnet\n")
    try:
        res = runner.invoke(app, ["weights"])
        assert res.exit_code == 0, res.output
        for text in ("hardnet (default)", "liberty", "FPR95 1.5%"):
            assert text in res.output
    finally:
        for p in no_weights.iterdir():
            p.unlink()


def test_extract_with_own_weights(example_dir: Path, tmp_path: Path, hardnet_ckpt: Path) -> None:
    ckpt = tmp_path / "mine.pt"
    shutil.copyfile(hardnet_ckpt, ckpt)
    out = tmp_path / "f.h5"
    res = runner.invoke(
        app,
        [
            "extract",
            str(example_dir / "view1.jpg"),
            str(out),
            "-m",
            "hardnet",
            "--weights",
            str(ckpt),
            "--max-keypoints",
            "100",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "patches/s" in res.output
    with Reader(out, "features") as r:
        assert r.attrs["method"] == "hardnet" and r.attrs["weights"] == "mine.pt"
        d = r.read("view1.jpg")["descriptors"]
        assert d.shape == (128, 100)
        np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-4)


# -- errors and exit codes -------------------------------------------------------------------
def test_missing_path_exit_code_and_one_line_message(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    proc = run_cli("extract", str(missing), str(tmp_path / "f.h5"), "-m", "rootsift")
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert str(missing) in line
    assert proc.stdout == ""
    assert not (tmp_path / "f.h5").exists()


def test_learned_net_without_weights_exit_code(example_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("extract", str(example_dir), str(tmp_path / "f.h5"), "-m", "sosnet")
    assert proc.returncode == 4
    line = _error_line(proc.stderr)
    assert "descmatch train" in line and "--weights" in line


def test_error_exit_codes_in_process(
    call_main: Callable[..., MainResult], example_dir: Path, scene_dir: Path, tmp_path: Path
) -> None:
    feats = tmp_path / "sift.h5"
    code, out, err = call_main(
        "extract", str(scene_dir), str(feats), "-m", "sift", "--max-keypoints", "50"
    )
    assert code == 0 and "3 image(s)" in out
    # Another method into the same file: 3, the file named, the file kept.
    before = feats.read_bytes()
    code, _, err = call_main(
        "extract", str(scene_dir), str(feats), "-m", "rootsift", "--max-keypoints", "50"
    )
    assert code == 3 and str(feats) in _error_line(err)
    assert feats.read_bytes() == before
    # Not HDF5: 3.
    bogus = tmp_path / "bogus.h5"
    bogus.write_text("hello")
    code, _, err = call_main("match", str(bogus), str(tmp_path / "m.h5"))
    assert code == 3 and str(bogus) in _error_line(err)
    # A corrupt image with --strict: 2; without: skipped and listed.
    (scene_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    code, _, err = call_main(
        "extract",
        str(scene_dir),
        str(tmp_path / "s.h5"),
        "-m",
        "sift",
        "--strict",
        "--max-keypoints",
        "50",
    )
    assert code == 2 and "bad.png" in _error_line(err)
    code, out, _ = call_main(
        "extract", str(scene_dir), str(tmp_path / "s2.h5"), "-m", "sift", "--max-keypoints", "50"
    )
    assert code == 0 and "1 unreadable" in out and "bad.png" in out
    # Weights that do not load: 4.
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    code, _, err = call_main(
        "extract", str(scene_dir), str(tmp_path / "w.h5"), "-m", "hardnet", "--weights", str(junk)
    )
    assert code == 4 and str(junk) in _error_line(err)
    # An unknown device: 2.
    code, _, err = call_main(
        "extract", str(scene_dir), str(tmp_path / "d.h5"), "-m", "sift", "--device", "tpu"
    )
    assert code == 2 and "tpu" in _error_line(err)
    # Output folder missing: 3.
    code, _, err = call_main(
        "extract", str(scene_dir), str(tmp_path / "nope" / "f.h5"), "-m", "sift"
    )
    assert code == 3 and "nope" in _error_line(err)


def test_two_image_mode_missing_image_exits_2(
    call_main: Callable[..., MainResult], example_dir: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "ghost.jpg"
    code, _, err = call_main(
        "match", str(example_dir / "view1.jpg"), str(missing), "-m", "rootsift"
    )
    assert str(missing) in _error_line(err)
    assert code == 2


def test_error_message_keeps_brackets(call_main: Callable[..., MainResult], tmp_path: Path) -> None:
    pattern = f"{tmp_path}/shots/[ab]*.jpg"
    code, _, err = call_main("extract", pattern, str(tmp_path / "f.h5"), "-m", "rootsift")
    assert code == 2
    assert pattern in _error_line(err)


def test_interrupt_exits_130_with_a_message(
    call_main: Callable[..., MainResult],
    monkeypatch: pytest.MonkeyPatch,
    scene_dir: Path,
    tmp_path: Path,
) -> None:
    import descmatch.extract

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(descmatch.extract, "extract", interrupted)
    code, _, err = call_main("extract", str(scene_dir), str(tmp_path / "f.h5"), "-m", "sift")
    assert "interrupted" in err
    assert code == 130


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_dropped_by_a_finalizer_still_stops_the_command(
    scene_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    call_main: Callable[..., MainResult],
) -> None:
    """A SIGTERM that lands while Python runs a finalizer raises its KeyboardInterrupt there,
    where Python prints and drops it: the command still stops and exits 130."""
    import descmatch.extract

    class Finalized:
        def __del__(self) -> None:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # type: ignore[operator]

    real = descmatch.extract.extract

    def extract_with_a_dropped_sigterm(*args: object, **kwargs: object) -> object:
        Finalized()  # collected at once: the handler runs inside __del__
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(descmatch.extract, "extract", extract_with_a_dropped_sigterm)
    code, _, err = call_main("extract", str(scene_dir), str(tmp_path / "f.h5"), "-m", "sift")
    assert code == 130 and "interrupted: finished work is saved" in err, err


def test_sigterm_saves_finished_work_and_the_rerun_completes(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_scenes(folder, 40, width=256, height=192)
    out = tmp_path / "f.h5"
    part = tmp_path / "f.h5.part"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "descmatch",
            "extract",
            str(folder),
            str(out),
            "-m",
            "rootsift",
            "--max-keypoints",
            "300",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        # Wait until the .part file holds an image's data (300 x 128 floats), then a bit.
        while (
            proc.poll() is None
            and time.monotonic() < deadline
            and not (part.exists() and part.stat().st_size > 150_000)
        ):
            time.sleep(0.01)
        assert part.exists(), "the run never started writing"
        time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not part.exists()  # merged on the way out
    with Reader(out, "features") as r:
        done = len(r.keys)
    assert 1 <= done < 40
    res = extract(
        list_images(folder), out, build_describer("rootsift"), SiftDetector(max_keypoints=300)
    )
    assert res.skipped_existing == done and res.images == 40 - done
    with Reader(out, "features") as r:
        assert len(r.keys) == 40


def test_entry_point_script_is_installed(tmp_path: Path) -> None:
    exe = shutil.which("descmatch")
    if exe is None:
        pytest.skip("descmatch console script not on PATH")
    proc = subprocess.run(
        [exe, "weights"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0 and "weights" in proc.stdout


def test_quiet_after_the_command(example_dir: Path, tmp_path: Path) -> None:
    """--quiet / --verbose are global options but are also accepted after the command."""
    out = tmp_path / "q.h5"
    res = run_cli(
        "extract",
        str(example_dir),
        str(out),
        "--method",
        "sift",
        "--quiet",
        "--max-keypoints",
        "100",
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ""
    assert out.exists()
    loud = run_cli(
        "extract",
        str(example_dir),
        str(tmp_path / "l.h5"),
        "--method",
        "sift",
        "--max-keypoints",
        "100",
    )
    assert "image(s)" in loud.stdout
