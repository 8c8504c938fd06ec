"""Killed runs resume to what an uninterrupted run makes: kill -9 at seeded random points of
``extract``, ``match`` and ``sfm`` (real processes), SIGTERM to ``sfm`` in each of its stages
(pycolmap's own handler must not take it), and an ``sfm`` stopped between its stages after a
new image joined: the database and the model are rebuilt, never kept stale."""

from __future__ import annotations

import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_scenes

from descmatch.h5 import Reader

RUN = [sys.executable, "-m", "descmatch"]
SEED = 19


def contents(path: Path, kind: str) -> dict[str, dict[str, np.ndarray]]:
    with Reader(path, kind) as r:
        return {k: r.read(k) for k in r.keys}


def assert_same(a: Path, b: Path, kind: str) -> None:
    ca, cb = contents(a, kind), contents(b, kind)
    assert sorted(ca) == sorted(cb)
    for k in ca:
        assert sorted(ca[k]) == sorted(cb[k]), k
        for n in ca[k]:
            np.testing.assert_array_equal(ca[k][n], cb[k][n], err_msg=f"{k}/{n}")


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def killed_at(cmd: list[str], seconds: float, sig: int = signal.SIGKILL) -> int:
    """Start ``cmd``, send ``sig`` after ``seconds`` (if still running); its exit code."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        p.send_signal(sig)
    return p.wait(timeout=120)


def kill_times(total: float, n: int, rng: random.Random) -> list[float]:
    """n seeded points in the run's working time (after the interpreter's start-up)."""
    start = min(2.0, 0.5 * total)
    return sorted(rng.uniform(start, total) for _ in range(n))


def test_extract_and_match_killed_at_random_points_resume_to_the_clean_result(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    folder = tmp_path / "imgs"
    write_scenes(folder, 6)
    opts = ["-m", "rootsift", "--max-keypoints", "300"]
    clean_f, clean_m = tmp_path / "clean.h5", tmp_path / "clean-m.h5"
    t0 = time.monotonic()
    assert run([*RUN, "extract", str(folder), str(clean_f), *opts]).returncode == 0
    t_extract = time.monotonic() - t0
    t0 = time.monotonic()
    assert run([*RUN, "match", str(clean_f), str(clean_m)]).returncode == 0
    t_match = time.monotonic() - t0

    feats = tmp_path / "f.h5"
    for t in kill_times(t_extract, 2, rng):
        killed_at([*RUN, "extract", str(folder), str(feats), *opts], t)
    done = run([*RUN, "extract", str(folder), str(feats), *opts])
    assert done.returncode == 0, done.stderr
    assert_same(clean_f, feats, "features")

    matches = tmp_path / "m.h5"
    for t in kill_times(t_match, 2, rng):
        killed_at([*RUN, "match", str(feats), str(matches)], t)
    done = run([*RUN, "match", str(feats), str(matches)])
    assert done.returncode == 0, done.stderr
    assert_same(clean_m, matches, "matches")
    leftovers = [p.name for p in tmp_path.iterdir() if p.suffix in (".part", ".tmp", ".lock")]
    assert leftovers == []


# -- sfm ---------------------------------------------------------------------------------------
SFM_OPTS = ["-m", "rootsift", "--max-keypoints", "800", "--threads", "1"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pycolmap")
    from fixtures_sfm import make_scene

    root = tmp_path_factory.mktemp("kill-scene")
    make_scene(root, 5, seed=0)
    return root / "images"


def _registered(stdout: str) -> tuple[int, int]:
    m = re.search(r"(\d+)/(\d+) images registered", stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2))


def test_sfm_killed_at_random_points_resumes_to_the_clean_result(
    scene: Path, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    clean = tmp_path / "clean"
    t0 = time.monotonic()
    res = run([*RUN, "sfm", str(scene), str(clean), *SFM_OPTS])
    total = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    for t in kill_times(total, 2, rng):
        killed_at([*RUN, "sfm", str(scene), str(out), *SFM_OPTS], t)
    done = run([*RUN, "sfm", str(scene), str(out), *SFM_OPTS])
    assert done.returncode == 0, done.stderr
    assert _registered(done.stdout) == _registered(res.stdout) == (5, 5)
    assert_same(clean / "features.h5", out / "features.h5", "features")
    assert_same(clean / "matches.h5", out / "matches.h5", "matches")


def _sigterm_when(cmd: list[str], marker: Path, timeout: float = 120) -> tuple[int, str]:
    """Run cmd, SIGTERM it as soon as ``marker`` exists; (exit code, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while p.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, f"finished before {marker.name} appeared"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


def test_sigterm_reaches_descmatch_in_every_sfm_stage(scene: Path, tmp_path: Path) -> None:
    """SIGTERM in extract, in export (pycolmap's verification) and in mapping (pycolmap's
    incremental mapper): exit 130 with descmatch's message, never COLMAP's stack trace; each
    rerun resumes, and the last one finishes."""
    out = tmp_path / "out"
    cmd = [*RUN, "sfm", str(scene), str(out), *SFM_OPTS]
    for marker in ("features.h5.part", "database.db", "sparse.part"):
        # The marker must be this run's (a leftover of the last one would be seen at once).
        shutil.rmtree(out / marker, ignore_errors=True)
        (out / marker).unlink(missing_ok=True)
        code, err = _sigterm_when(cmd, out / marker)
        assert code == 130, (marker, err)
        assert "interrupted: finished work is saved" in err, (marker, err)
        assert "SIGTERM" not in err and "stack trace" not in err.lower(), (marker, err)
        assert not (out / "sfm.lock").exists()
    done = run(cmd)
    assert done.returncode == 0, done.stderr
    assert _registered(done.stdout) == (5, 5)


def _run_sfm(images: Path, out: Path) -> object:
    from descmatch.describe import build_describer
    from descmatch.detect import SiftDetector
    from descmatch.images import list_images
    from descmatch.sfm import SfmConfig, run_sfm

    return run_sfm(
        list_images(images),
        out,
        SiftDetector(max_keypoints=800),
        build_describer("rootsift"),
        SfmConfig(num_threads=1),
    )


@pytest.mark.parametrize("stopped_in", ["export", "mapping"])
def test_sfm_stopped_after_match_with_a_new_image_rebuilds_database_and_model(
    scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stopped_in: str
) -> None:
    import descmatch.sfm

    images = tmp_path / "images"
    images.mkdir()
    for p in sorted(scene.iterdir())[:4]:
        shutil.copy(p, images)
    out = tmp_path / "out"
    first = _run_sfm(images, out)
    assert first.registered == 4  # type: ignore[attr-defined]

    shutil.copy(sorted(scene.iterdir())[4], images)  # a new image

    def killed(*a: object, **k: object) -> None:
        raise KeyboardInterrupt  # the process dies here, with the stage's files half made

    with monkeypatch.context() as m:
        m.setattr(descmatch.sfm, "export_colmap" if stopped_in == "export" else "_map", killed)
        with pytest.raises(KeyboardInterrupt):
            _run_sfm(images, out)
    again = _run_sfm(images, out)
    skipped = {s.name: s.skipped for s in again.stages}  # type: ignore[attr-defined]
    assert skipped["extract"] and skipped["match"]  # finished before the kill: kept
    assert not skipped["mapping"]
    assert skipped["export"] == (stopped_in == "mapping")
    assert again.registered == again.images == 5  # type: ignore[attr-defined]
    third = _run_sfm(images, out)  # and now everything is up to date
    assert all(s.skipped for s in third.stages)  # type: ignore[attr-defined]
