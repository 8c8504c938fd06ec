"""features.h5 / matches.h5: schema, resuming, interruption, crash recovery from the .part
file, refusing files that do not fit (without touching them), unwritable outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SMALL_KEYPOINTS, write_scenes

from descmatch import __version__
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import InputError, OutputError, SchemaError
from descmatch.extract import ExtractResult, extract
from descmatch.h5 import SCHEMA_VERSION, Reader, Writer, check_file, read_features
from descmatch.images import list_images
from descmatch.match import match
from descmatch.pairs import exhaustive

COMPLETE = "_descmatch_complete"


def run_extract(
    folder: Path,
    out: Path,
    method: str = "rootsift",
    max_keypoints: int = SMALL_KEYPOINTS,
    **kw: object,
) -> ExtractResult:
    return extract(
        list_images(folder),
        out,
        build_describer(method),
        SiftDetector(max_keypoints=max_keypoints),
        **kw,
    )  # type: ignore[arg-type]


def contents(path: Path) -> dict[str, dict[str, np.ndarray]]:
    with Reader(path, "features") as r:
        return {k: r.read(k) for k in r.keys}


def assert_same_contents(
    a: dict[str, dict[str, np.ndarray]], b: dict[str, dict[str, np.ndarray]]
) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key]), key
        for name in a[key]:
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=f"{key}/{name}")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".part", ".tmp"))


# -- schema ----------------------------------------------------------------------------------
def test_features_file_schema(scene_dir: Path, tmp_path: Path) -> None:
    write_scenes(scene_dir / "sub", 1, first_seed=40)  # sub/img0.png: a nested group
    out = tmp_path / "features.h5"
    res = run_extract(scene_dir, out)
    assert res.images == 4 and res.skipped_existing == 0 and not res.failed
    assert res.keypoints > 0 and res.path == out
    assert leftovers(tmp_path) == []
    with Reader(out, "features") as r:
        assert sorted(r.keys) == ["img0.png", "img1.png", "img2.png", "sub/img0.png"]
        a = r.attrs
        assert a["descmatch_schema"] == SCHEMA_VERSION
        assert a["descmatch_kind"] == "features"
        assert a["descmatch_version"] == __version__
        assert a["method"] == "rootsift"
        assert int(a["descriptor_dim"]) == 128
        assert a["weights"] == "" and a["weights_sha256"] == ""
        settings = json.loads(a["settings"])
        assert settings["detector"] == "sift"
        assert settings["max_keypoints"] == SMALL_KEYPOINTS
        assert settings["resize_max"] is None
        assert r.settings == settings
        total = 0
        for key in r.keys:
            f = r.read(key)
            assert set(f) == {"keypoints", "descriptors", "scores", "scales", "oris", "image_size"}
            n = f["keypoints"].shape[0]
            total += n
            assert 0 < n <= SMALL_KEYPOINTS
            assert f["keypoints"].shape == (n, 2) and f["keypoints"].dtype == np.float32
            assert f["descriptors"].shape == (128, n) and f["descriptors"].dtype == np.float32
            for name in ("scores", "scales", "oris"):
                assert f[name].shape == (n,) and f[name].dtype == np.float32, name
            assert f["image_size"].dtype == np.int32
            assert f["image_size"].tolist() == [200, 150]  # (width, height)
            xy = f["keypoints"]
            assert (xy[:, 0] >= -0.5).all() and (xy[:, 0] <= 199.5).all()
            assert (xy[:, 1] >= -0.5).all() and (xy[:, 1] <= 149.5).all()
            assert (np.diff(f["scores"]) <= 0).all()  # strongest first
            assert (f["scales"] > 0).all()
            assert ((f["oris"] >= 0) & (f["oris"] < 360)).all()
        assert total == res.keypoints
    with h5py.File(out, "r") as f:
        assert isinstance(f["sub"], h5py.Group) and "img0.png" in f["sub"]
        for key in ("img0.png", "sub/img0.png"):
            assert COMPLETE not in f[key].attrs  # the .part marker is not in the output
    assert check_file(out, "features")["method"] == "rootsift"
    np.testing.assert_array_equal(
        read_features(out, "img1.png")["keypoints"], contents(out)["img1.png"]["keypoints"]
    )


def test_half_stores_float16(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "half.h5"
    run_extract(scene_dir, out, half=True)
    f = read_features(out, "img0.png")
    assert f["descriptors"].dtype == np.float16
    norms = np.linalg.norm(f["descriptors"].astype(np.float32), axis=0)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_detect_only_file_has_no_descriptors(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "kp.h5"
    res = extract(list_images(scene_dir), out, None, SiftDetector(max_keypoints=50))
    assert res.images == 3
    with Reader(out, "features") as r:
        assert r.attrs["method"] == "none" and int(r.attrs["descriptor_dim"]) == 0
        f = r.read("img0.png")
        assert "descriptors" not in f and f["keypoints"].shape == (50, 2)
    with pytest.raises(InputError, match="keypoints only"):
        match(out, exhaustive(["img0.png", "img1.png"]), tmp_path / "m.h5")


def test_reader_errors(tmp_path: Path, scene_dir: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        Reader(tmp_path / "missing.h5", "features")
    out = tmp_path / "f.h5"
    run_extract(scene_dir, out, max_keypoints=20)
    with Reader(out, "features") as r:
        assert "img0.png" in r and "nope.png" not in r
        with pytest.raises(InputError, match="nope.png"):
            r.read("nope.png")
    with pytest.raises(SchemaError, match="not matches"):
        Reader(out, "matches")


# -- resuming --------------------------------------------------------------------------------
def test_second_run_processes_nothing_and_leaves_the_file_alone(
    scene_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f.h5"
    run_extract(scene_dir, out)
    before = out.read_bytes()
    res = run_extract(scene_dir, out)
    assert res.images == 0 and res.skipped_existing == 3 and res.keypoints == 0
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_new_image_is_the_only_one_processed(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    run_extract(scene_dir, out)
    old = contents(out)
    write_scenes(scene_dir / "more", 1, first_seed=77)
    seen: list[str] = []
    res = run_extract(scene_dir, out, progress=lambda i, n, name: seen.append(name))
    assert res.images == 1 and res.skipped_existing == 3
    assert seen == ["more/img0.png"]
    new = contents(out)
    assert sorted(new) == sorted([*old, "more/img0.png"])
    assert_same_contents(old, {k: v for k, v in new.items() if k in old})


def test_overwrite_recomputes_everything(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    run_extract(scene_dir, out, method="sift")
    res = run_extract(scene_dir, out, method="rootsift", overwrite=True)
    assert res.images == 3 and res.skipped_existing == 0
    with Reader(out, "features") as r:
        assert r.attrs["method"] == "rootsift" and len(r.keys) == 3


# -- interruption and crashes ----------------------------------------------------------------
def test_ctrl_c_keeps_finished_images_and_a_rerun_completes(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_scenes(folder, 5)
    out = tmp_path / "f.h5"
    done: list[str] = []

    def interrupt_after_two(i: int, n: int, name: str) -> None:
        done.append(name)
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(folder, out, progress=interrupt_after_two)
    assert done == ["img0.png", "img1.png"]
    assert leftovers(tmp_path) == []
    with Reader(out, "features") as r:
        assert sorted(r.keys) == ["img0.png", "img1.png"]
    partial = contents(out)
    res = run_extract(folder, out)
    assert res.images == 3 and res.skipped_existing == 2
    full = contents(out)
    assert sorted(full) == [f"img{i}.png" for i in range(5)]
    assert_same_contents(partial, {k: full[k] for k in partial})
    # The same as an uninterrupted run.
    clean = tmp_path / "clean.h5"
    run_extract(folder, clean)
    assert_same_contents(contents(clean), full)


_KILL_SCRIPT = """
import os, sys
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.extract import extract
from descmatch.images import list_images

def die(i, n, name):
    if i == 2:
        os._exit(9)  # no cleanup at all, like SIGKILL or a power cut

extract(list_images(sys.argv[1]), sys.argv[2], build_describer("rootsift"),
        SiftDetector(max_keypoints=int(sys.argv[3])), progress=die)
"""


def test_hard_kill_leaves_a_part_file_whose_complete_groups_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_scenes(folder, 4)
    out = tmp_path / "f.h5"
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(folder), str(out), str(SMALL_KEYPOINTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr
    assert not out.exists()  # never written in place
    part = tmp_path / "f.h5.part"
    assert part.exists()
    seen: list[str] = []
    res = run_extract(folder, out, progress=lambda i, n, name: seen.append(name))
    assert res.skipped_existing == 2 and res.images == 2
    assert seen == ["img2.png", "img3.png"]
    assert not part.exists()
    clean = tmp_path / "clean.h5"
    run_extract(folder, clean)
    assert_same_contents(contents(clean), contents(out))


def _attrs_of(path: Path) -> dict[str, object]:
    with Reader(path, "features") as r:
        return {
            k: r.attrs[k]
            for k in ("method", "descriptor_dim", "weights", "weights_sha256", "settings")
        }


def test_part_file_of_a_killed_run_next_to_an_existing_output(
    scene_dir: Path, tmp_path: Path
) -> None:
    """Output with img0, img1; a killed run wrote img2 completely and img3 half-way."""
    out = tmp_path / "f.h5"
    clean = tmp_path / "clean.h5"
    write_scenes(scene_dir, 4)  # img0..img3
    run_extract(scene_dir, clean)
    full = contents(clean)
    attrs = _attrs_of(clean)
    must = ("method", "descriptor_dim", "weights_sha256", "settings")
    with Writer(out, "features", attrs, must_match=must) as w:
        for key in ("img0.png", "img1.png"):
            w.write(key, full[key])
    before = out.read_bytes()

    w = Writer(out, "features", attrs, must_match=must)
    assert w.done == {"img0.png", "img1.png"}
    w.write("img2.png", full["img2.png"])
    g = w._part_file().create_group("img3.png")  # a group the crash cut short
    g.create_dataset("keypoints", data=full["img3.png"]["keypoints"])
    w._part_file().close()  # the process dies: no merge
    assert out.read_bytes() == before
    assert (tmp_path / "f.h5.part").exists()

    res = run_extract(scene_dir, out)
    assert res.skipped_existing == 3 and res.images == 1  # img3 is redone
    assert leftovers(tmp_path) == []
    assert_same_contents(full, contents(out))
    with h5py.File(out, "r") as f:
        assert all(COMPLETE not in f[k].attrs for k in full)


def test_unreadable_part_file_is_discarded(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    (tmp_path / "f.h5.part").write_bytes(b"half-written garbage")
    res = run_extract(scene_dir, out)
    assert res.images == 3
    assert leftovers(tmp_path) == []


def test_part_file_of_another_method_is_refused(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    w = Writer(
        out,
        "features",
        {"method": "sift", "descriptor_dim": 128, "weights_sha256": "", "settings": "{}"},
    )
    w.write("img0.png", {"keypoints": np.zeros((0, 2), np.float32)})
    w._part_file().close()
    part = tmp_path / "f.h5.part"
    before = part.read_bytes()
    with pytest.raises(SchemaError) as e:
        run_extract(scene_dir, out)
    assert str(part) in str(e.value)
    assert part.read_bytes() == before and not out.exists()


# -- files that do not fit -------------------------------------------------------------------
def _not_hdf5(path: Path) -> None:
    path.write_bytes(b"I am a text file, not HDF5\n" * 10)


def _foreign_hdf5(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("img0.png/keypoints", data=np.zeros((3, 2), np.float32))
        f.attrs["creator"] = "hloc"


def _other_version(path: Path, scene_dir: Path) -> None:
    run_extract(scene_dir, path, max_keypoints=20)
    with h5py.File(path, "a") as f:
        f.attrs["descmatch_schema"] = SCHEMA_VERSION + 1


def _other_method(path: Path, scene_dir: Path) -> None:
    run_extract(scene_dir, path, method="sift", max_keypoints=20)


def _other_settings(path: Path, scene_dir: Path) -> None:
    run_extract(scene_dir, path, max_keypoints=20)


def _matches_file(path: Path, scene_dir: Path) -> None:
    feats = path.with_name("feats-for-matches.h5")
    run_extract(scene_dir, feats, max_keypoints=20)
    match(feats, exhaustive(["img0.png", "img1.png"]), path)


@pytest.mark.parametrize(
    "make,expect",
    [
        (lambda p, d: _not_hdf5(p), "HDF5"),
        (lambda p, d: _foreign_hdf5(p), "descmatch_schema"),
        (_other_version, "version"),
        (_other_method, "method"),
        (_other_settings, "settings"),
        (_matches_file, "matches"),
    ],
    ids=[
        "not-hdf5",
        "foreign-hdf5",
        "other-version",
        "other-method",
        "other-settings",
        "matches-file",
    ],
)
def test_existing_output_that_does_not_fit_is_refused_and_kept(
    make,
    expect: str,  # type: ignore[no-untyped-def]
    scene_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "features.h5"
    make(out, scene_dir)
    before = out.read_bytes()
    with pytest.raises(SchemaError) as e:
        run_extract(scene_dir, out, method="rootsift", max_keypoints=SMALL_KEYPOINTS)
    msg = str(e.value)
    assert str(out) in msg and expect in msg
    assert "\n" not in msg
    assert out.read_bytes() == before
    assert not (tmp_path / "features.h5.part").exists()
    assert not (tmp_path / "features.h5.tmp").exists()


# -- outputs that cannot be written ----------------------------------------------------------
def test_output_folder_missing(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "f.h5"
    with pytest.raises(OutputError) as e:
        run_extract(scene_dir, out)
    assert str(out.parent) in str(e.value)


def test_output_is_a_folder(scene_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "dir.h5"
    out.mkdir()
    with pytest.raises(OutputError, match="folder"):
        run_extract(scene_dir, out)


def test_output_below_a_regular_file(scene_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as e:
        run_extract(scene_dir, blocker / "f.h5")
    assert str(blocker) in str(e.value)


@pytest.mark.skipif(
    os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user"
)
def test_output_folder_not_writable(scene_dir: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError) as e:
            run_extract(scene_dir, ro / "f.h5")
        assert str(ro) in str(e.value)
    finally:
        ro.chmod(0o755)
