"""Faults on the output side: concurrent writers of one output, leftovers of dead processes,
pair keys that collide in hloc's scheme, outputs that are inputs, outputs that cannot be
written (found before any work), a full disk during the merge, and what reaches stderr."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SMALL_KEYPOINTS, MainResult, write_scenes

from descmatch import h5write
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import OutputError, SchemaError
from descmatch.extract import extract
from descmatch.h5 import Reader, Writer, find_pair, read_matches, stored_pairs
from descmatch.images import list_images
from descmatch.lock import lock_path
from descmatch.match import match, match_descriptors
from descmatch.pairkeys import escaped_pair_key, pair_key, parse_escaped_key, plan_keys
from descmatch.pairs import exhaustive

RUN = [sys.executable, "-m", "descmatch"]


def run_extract(folder: Path, out: Path, **kw: object) -> object:
    return extract(
        list_images(folder),
        out,
        build_describer("rootsift"),
        SiftDetector(max_keypoints=SMALL_KEYPOINTS),
        **kw,  # type: ignore[arg-type]
    )


def contents(path: Path, kind: str = "features") -> dict[str, dict[str, np.ndarray]]:
    with Reader(path, kind) as r:
        return {k: r.read(k) for k in r.keys}


def same(a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert sorted(a[k]) == sorted(b[k]), k
        for n in a[k]:
            np.testing.assert_array_equal(a[k][n], b[k][n], err_msg=f"{k}/{n}")


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- locks -----------------------------------------------------------------------------------
_HOLD = """
import sys, time
from descmatch.h5 import Writer
w = Writer(sys.argv[1], "features", {"method": "sift"})
w.write("img0.png", {"keypoints": __import__("numpy").zeros((1, 2), "float32")})
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
w.close()
"""


def _holder(out: Path, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "holding", p.stderr
    return p


def test_a_second_writer_stops_at_once_naming_the_first(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    holder = _holder(out, 60)
    try:
        part = out.with_name("f.h5.part")
        before = part.read_bytes()
        t0 = time.monotonic()
        proc = subprocess.run(
            [*RUN, "extract", str(scene_dir), str(out), "-m", "rootsift"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == OutputError.exit_code == 3, proc.stderr
        line = one_line_error(proc.stderr)
        assert f"process {holder.pid}" in line and "being written" in line
        assert time.monotonic() - t0 < 30  # no image was processed: it stopped at once
        assert part.read_bytes() == before  # the live part file is untouched
        assert holder.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_two_real_extract_runs_on_one_output_lose_nothing(tmp_path: Path) -> None:
    """Two `descmatch extract` started together: one writes, the other stops with exit 3;
    the output then holds every image (the old behaviour: both exit 0, 0 entries)."""
    folder = tmp_path / "imgs"
    write_scenes(folder, 12, width=240, height=180)
    out = tmp_path / "f.h5"
    cmd = [*RUN, "extract", str(folder), str(out), "-m", "rootsift", "--max-keypoints", "300"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not lock_path(out).exists() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    b = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    _, a_err = a.communicate(timeout=120)
    assert a.returncode == 0, a_err
    if b.returncode == 0:  # b started after a had finished: nothing left to do
        assert "12 already done" in b.stdout
    else:
        assert b.returncode == 3 and f"process {a.pid}" in one_line_error(b.stderr)
    with Reader(out, "features") as r:
        assert len(r.keys) == 12
    assert not lock_path(out).exists()


def test_a_writer_with_wait_proceeds_when_the_holder_finishes(
    scene_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f.h5"
    holder = _holder(out, 1.5)
    try:
        with Writer(out, "features", {"method": "sift"}, wait=True) as w:
            assert out.exists()  # got the lock only once the holder had merged
            assert w.done == {"img0.png"}
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()


def test_the_leftover_of_a_dead_process_is_resumed(
    scene_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "f.h5"
    holder = _holder(out, 60)
    holder.kill()  # SIGKILL: no cleanup, the lock file and the part file stay
    holder.wait()
    assert lock_path(out).exists() and out.with_name("f.h5.part").exists()
    with caplog.at_level("INFO"):
        w = Writer(out, "features", {"method": "sift"})
    assert w.done == {"img0.png"}
    assert f"process {holder.pid}" in caplog.text and "no longer running" in caplog.text
    w.close()
    assert contents(out)["img0.png"]["keypoints"].shape == (1, 2)
    assert not lock_path(out).exists()


# -- pair keys -------------------------------------------------------------------------------
NAMES = ["x-y.jpg", "x/y.jpg", "z.jpg"]


def _colliding_images(folder: Path, names: list[str] = NAMES) -> None:
    import cv2

    from descmatch.examples import render_scene

    for i, n in enumerate(names):
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / n), render_scene(200, 150, seed=30 + i))


def test_colliding_hloc_keys_store_every_pair(
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    folder = tmp_path / "imgs"
    _colliding_images(folder)
    feats, matches = tmp_path / "f.h5", tmp_path / "m.h5"
    assert call_main("extract", str(folder), str(feats), "-m", "rootsift")[0] == 0
    code, out, err = call_main("match", str(feats), str(matches), "--pairs", "exhaustive")
    assert code == 0, err
    assert "3 pair(s) matched" in out
    with Reader(matches, "matches") as r:
        assert len(r.keys) == 3  # hloc's key would have stored 2
        assert pair_key("x-y.jpg", "z.jpg") not in r  # hloc never reads the wrong pair
    with Reader(feats, "features") as fr:
        desc = {n: torch.from_numpy(fr.read(n)["descriptors"].T.copy()) for n in NAMES}
    for a, b in exhaustive(sorted(NAMES)):
        m, s = read_matches(matches, a, b)
        want, _ = match_descriptors(desc[a], desc[b])
        np.testing.assert_array_equal(m, want.numpy())
    # The pair that does not collide keeps hloc's key.
    with Reader(matches, "matches") as r:
        assert pair_key("x-y.jpg", "x/y.jpg") in r
        assert escaped_pair_key("x/y.jpg", "z.jpg") in r
        todo, skipped = stored_pairs(r, NAMES)
        assert sorted((a, b) for _, a, b in todo) == exhaustive(sorted(NAMES)) and not skipped


def test_a_colliding_image_added_later_moves_the_stored_pair(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    _colliding_images(folder, ["x/y.jpg", "z.jpg"])
    feats, matches = tmp_path / "f.h5", tmp_path / "m.h5"
    run_extract(folder, feats)
    match(feats, [("x/y.jpg", "z.jpg")], matches)
    with Reader(matches, "matches") as r:
        assert r.keys == [pair_key("x/y.jpg", "z.jpg")]
        first = r.read(r.keys[0])["matches0"]
    _colliding_images(folder, ["x/y.jpg", "z.jpg", "x-y.jpg"])
    run_extract(folder, feats)
    res = match(feats, exhaustive(sorted(NAMES)), matches)
    assert res.matched == 2 and res.skipped == 1
    with Reader(matches, "matches") as r:
        assert len(r.keys) == 3
        assert pair_key("x-y.jpg", "z.jpg") not in r
        assert find_pair(r, "x/y.jpg", "z.jpg") == (escaped_pair_key("x/y.jpg", "z.jpg"), False)
    np.testing.assert_array_equal(read_matches(matches, "x/y.jpg", "z.jpg")[0], first)


def test_pair_key_scheme() -> None:
    for a, b in [("x/y.jpg", "z.jpg"), ("a|b%2F.jpg", "c/d/e.png"), ("%7C", "|")]:
        key = escaped_pair_key(a, b)
        assert "/" not in key and parse_escaped_key(key) == (a, b)
    assert parse_escaped_key(pair_key("x/y.jpg", "z.jpg")) is None
    plan = plan_keys([("x/y.jpg", "z.jpg"), ("x-y.jpg", "z.jpg"), ("x/y.jpg", "x-y.jpg")], {})
    assert plan.keys[("x/y.jpg", "x-y.jpg")] == "x-y.jpg/x-y.jpg"
    assert len(set(plan.keys.values())) == 3
    # A file of hloc (groups without names) is read back where its key is unambiguous.
    plan = plan_keys([("a.jpg", "b.jpg")], {"a.jpg/b.jpg": None})
    assert plan.done == {("a.jpg", "b.jpg")} and not plan.keys


def test_export_colmap_writes_every_colliding_pair(tmp_path: Path) -> None:
    pytest.importorskip("pycolmap")
    from descmatch.export.colmap import export_colmap

    folder = tmp_path / "imgs"
    _colliding_images(folder)
    feats, matches = tmp_path / "f.h5", tmp_path / "m.h5"
    run_extract(folder, feats)
    match(feats, exhaustive(sorted(NAMES)), matches)
    res = export_colmap(feats, matches, list_images(folder), tmp_path / "db.db", verify=False)
    assert res.pairs == 3 and res.skipped_pairs == 0


# -- outputs that are inputs -----------------------------------------------------------------
def test_match_refuses_the_features_file_as_output(
    example_features: Path, tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    feats = tmp_path / "f.h5"
    shutil.copyfile(example_features, feats)
    before = feats.read_bytes()
    code, _, err = call_main("match", str(feats), str(feats), "--overwrite")
    assert code == 3 and "also an input" in one_line_error(err)
    code, _, err = call_main("match", str(feats), str(tmp_path / "m.h5"), "--pairs-out", str(feats))
    assert code == 3 and "also an input" in one_line_error(err)
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("view1.jpg view2.jpg\n")
    code, _, err = call_main(
        "match",
        str(feats),
        str(tmp_path / "m.h5"),
        "--pairs",
        str(pairs),
        "--pairs-out",
        str(pairs),
    )
    assert code == 3 and "also an input" in one_line_error(err)
    assert pairs.read_text() == "view1.jpg view2.jpg\n"
    assert feats.read_bytes() == before and not (tmp_path / "m.h5").exists()


def test_extract_refuses_an_image_as_output(
    scene_dir: Path, call_main: Callable[..., MainResult]
) -> None:
    img = scene_dir / "img2.png"
    before = img.read_bytes()
    code, _, err = call_main("extract", str(scene_dir), str(img), "--overwrite", "-m", "rootsift")
    assert code == 3 and "also an input" in one_line_error(err)
    link = scene_dir.parent / "link.h5"
    link.symlink_to(img)
    code, _, err = call_main("extract", str(scene_dir), str(link), "--overwrite", "-m", "rootsift")
    assert code == 3 and "also an input" in one_line_error(err)
    assert img.read_bytes() == before
    listing = scene_dir.parent / "list.txt"
    listing.write_text("imgs/img0.png\n")
    code, _, err = call_main("extract", str(listing), str(listing), "-m", "rootsift")
    assert code == 3 and listing.read_text() == "imgs/img0.png\n"


# -- outputs that cannot be written, found before any work -----------------------------------
@pytest.mark.parametrize(
    "viz, why",
    [("out.txt", "not a picture format"), ("/nonexistent/x.png", "does not exist")],
)
def test_viz_is_checked_before_any_work(
    viz: str,
    why: str,
    example_dir: Path,
    tmp_path: Path,
    call_main: Callable[..., MainResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import descmatch.two_view

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("matched before checking --viz")

    monkeypatch.setattr(descmatch.two_view, "match_images", no_work)
    monkeypatch.chdir(tmp_path)
    a, b = example_dir / "view1.jpg", example_dir / "view2.jpg"
    code, _, err = call_main("match", str(a), str(b), "--viz", viz, "-m", "rootsift")
    assert code == 3 and why in one_line_error(err)


def test_unwritable_outputs_fail_before_the_first_image(
    scene_dir: Path,
    tmp_path: Path,
    call_main: Callable[..., MainResult],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import descmatch.extract

    def no_work(*a: object, **k: object) -> None:
        raise AssertionError("an image was read before the output was checked")

    monkeypatch.setattr(descmatch.extract, "_load", no_work)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in ("/proc/descmatch-test.h5", str(blocker / "f.h5"), "/nonexistent/f.h5"):
        code, _, err = call_main("extract", str(scene_dir), out, "-m", "rootsift")
        assert code == 3, (out, err)
        assert out.rsplit("/", 1)[0] in one_line_error(err)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root writes anywhere: a read-only mount needs privileges
            pytest.skip("needs a non-root user for a read-only folder")
        code, _, err = call_main("extract", str(scene_dir), str(ro / "f.h5"), "-m", "rootsift")
        assert code == 3 and str(ro) in one_line_error(err)
    finally:
        ro.chmod(0o700)


def test_sfm_output_folder_that_cannot_be_made(
    scene_dir: Path, tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    pytest.importorskip("pycolmap")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in ("/proc/descmatch-test", str(blocker / "out"), str(blocker)):
        code, _, err = call_main("sfm", str(scene_dir), out, "-m", "rootsift")
        assert code == 3, (out, err)
        one_line_error(err)


def test_examples_into_an_existing_file_is_one_line(
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    f = tmp_path / "file"
    f.write_text("mine")
    code, _, err = call_main("examples", str(f))
    assert code == 3 and str(f) in one_line_error(err)
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "view2.jpg").write_text("my own file")
    code, _, err = call_main("examples", str(tmp_path / "ex"))
    assert code == 3 and "not replaced" in one_line_error(err)
    assert (tmp_path / "ex" / "view2.jpg").read_text() == "my own file"
    assert not (tmp_path / "ex" / "view1.jpg").exists()


# -- a full disk -----------------------------------------------------------------------------
def test_full_disk_during_the_merge_keeps_everything(
    tmp_path: Path, call_main: Callable[..., MainResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "imgs"
    write_scenes(folder, 4)
    out = tmp_path / "f.h5"
    run_extract(folder / "img0.png", out)
    before = out.read_bytes()

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(h5write.shutil, "copyfile", full)
    code, _, err = call_main(
        "extract", str(folder), str(out), "-m", "rootsift", "--max-keypoints", str(SMALL_KEYPOINTS)
    )
    assert code == 3
    line = one_line_error(err)
    assert "No space left on device" in line and "f.h5.part" in line
    assert out.read_bytes() == before
    assert not out.with_name("f.h5.tmp").exists() and not lock_path(out).exists()
    with h5py.File(out.with_name("f.h5.part"), "r") as f:
        assert len(f) == 3  # the new work is kept
    monkeypatch.undo()
    res = run_extract(folder, out)
    assert res.images == 0 and res.skipped_existing == 4  # type: ignore[attr-defined]
    clean = tmp_path / "clean.h5"
    run_extract(folder, clean)
    same(contents(clean), contents(out))


def test_full_disk_while_writing_the_part_file(tmp_path: Path, scene_dir: Path) -> None:
    out = tmp_path / "f.h5"
    w = Writer(out, "features", {"method": "sift"})
    w.write("a", {"keypoints": np.zeros((2, 2), np.float32)})
    f = w._part_file()
    real = f.flush

    def full() -> None:
        raise OSError(errno.ENOSPC, "Can't write data")

    f.flush = full  # type: ignore[method-assign]
    with pytest.raises(OutputError) as e:
        w.write("b", {"keypoints": np.zeros((2, 2), np.float32)})
    assert "No space left on device" in str(e.value) and "kept" in str(e.value)
    f.flush = real  # type: ignore[method-assign]
    w.close()
    assert sorted(contents(out)) == ["a"]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> object:
    """A 4 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_on_a_real_file_system(tmp_path: Path, tiny_tmpfs: Path) -> None:
    """A real ENOSPC (a tiny tmpfs): the run stops with one line and exit 3, the output and
    the part file are as they were; with space freed, the rerun equals a clean run."""
    folder = tmp_path / "imgs"
    write_scenes(folder, 6)
    out = tiny_tmpfs / "f.h5"
    cmd = [*RUN, "extract", "-m", "rootsift", "--max-keypoints", str(SMALL_KEYPOINTS)]
    first = subprocess.run([*cmd, str(folder / "img0.png"), str(out)], capture_output=True)
    assert first.returncode == 0, first.stderr
    size = out.stat().st_size
    before = out.read_bytes()
    # Leave room for the part file of the other images but not for the merged copy.
    filler = tiny_tmpfs / "filler"
    free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
    room = 6 * size + (size // 2)
    filler.write_bytes(b"\0" * max(0, free - room))
    proc = subprocess.run([*cmd, str(folder), str(out)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "No space left on device" in one_line_error(proc.stderr)
    assert out.read_bytes() == before
    assert not (tiny_tmpfs / "f.h5.tmp").exists()
    filler.unlink()
    proc = subprocess.run([*cmd, str(folder), str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    clean = tmp_path / "clean.h5"
    run_extract(folder, clean)
    same(contents(clean), contents(out))


# -- what reaches stderr ---------------------------------------------------------------------
def test_settings_mismatch_names_the_keys_that_differ(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    run_extract(scene_dir, out)
    with pytest.raises(SchemaError) as e:
        extract(
            list_images(scene_dir),
            out,
            build_describer("rootsift"),
            SiftDetector(max_keypoints=SMALL_KEYPOINTS + 1),
            max_side=120,
        )
    msg = str(e.value)
    assert "max_keypoints=" in msg and "resize_max=None (this run: 120)" in msg
    assert "{" not in msg and "\n" not in msg


def test_piped_stderr_has_no_blank_lines_nor_padding(tmp_path: Path, scene_dir: Path) -> None:
    (scene_dir / "bad.png").write_bytes(b"not an image at all")
    proc = subprocess.run(
        [*RUN, "extract", str(scene_dir), str(tmp_path / "f.h5"), "-m", "rootsift"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(ln.strip() for ln in lines), repr(proc.stderr)
    assert all(ln == ln.rstrip() for ln in lines), repr(proc.stderr)
    assert any(ln.startswith("WARNING: ") and "bad.png" in ln for ln in lines)
