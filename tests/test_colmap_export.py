"""``descmatch export colmap``: the COLMAP database round trip (cameras, images, keypoints
+0.5, matches in both image orders, descriptors as uint8, two-view geometries), EXIF focal
lengths, and its errors."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures_sfm import HEIGHT, WIDTH, make_scene

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import InputError, OutputError
from descmatch.export.colmap import (
    COLMAP_VERSIONS,
    FILM_DIAGONAL_MM,
    colmap_descriptors,
    exif_focal_35mm,
    export_colmap,
    focal_prior,
)
from descmatch.export.colmap3 import is_colmap3, pair_id
from descmatch.extract import extract
from descmatch.h5 import Reader, Writer, read_matches
from descmatch.images import list_images
from descmatch.match import match
from descmatch.pairs import exhaustive

pycolmap = pytest.importorskip("pycolmap")

VIEWS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A rendered room seen by 4 cameras: (images folder, features.h5, matches.h5).
    Read-only."""
    root = tmp_path_factory.mktemp("colmap-scene")
    make_scene(root, VIEWS, seed=7)
    imgs = root / "images"
    feats, matches = root / "features.h5", root / "matches.h5"
    images = list_images(imgs)
    extract(images, feats, build_describer("rootsift"), SiftDetector(max_keypoints=800))
    match(feats, exhaustive(images.names), matches)
    return imgs, feats, matches


def _db(path: Path) -> dict:
    with pycolmap.Database.open(str(path)) as db:
        images = {im.name: im for im in db.read_all_images()}
        return {
            "images": images,
            "cameras": {c.camera_id: c for c in db.read_all_cameras()},
            "frames": db.read_all_frames(),
            "rigs": db.read_all_rigs(),
            "keypoints": {n: db.read_keypoints(im.image_id) for n, im in images.items()},
            "descriptors": {
                n: db.read_descriptors(im.image_id).data
                for n, im in images.items()
                if db.exists_descriptors(im.image_id)
            },
            "matches": db.read_all_matches(),
            "tvg": dict(zip(*db.read_two_view_geometries(), strict=True)),
        }


@pytest.mark.parametrize("version", COLMAP_VERSIONS)
def test_database_round_trip(scene: tuple[Path, Path, Path], tmp_path: Path, version: str) -> None:
    imgs, feats, matches = scene
    db_path = tmp_path / "database.db"
    res = export_colmap(
        feats,
        matches,
        list_images(imgs),
        db_path,
        descriptors=True,
        num_threads=1,
        colmap_version=version,
    )
    assert db_path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["database.db"]
    assert is_colmap3(db_path) == (version == "3")
    n_pairs = VIEWS * (VIEWS - 1) // 2
    assert (res.images, res.cameras, res.pairs) == (VIEWS, 1, n_pairs)
    assert res.verified_pairs == n_pairs and 0 < res.inlier_matches <= res.matches

    d = _db(db_path)
    assert sorted(d["images"]) == [f"v{i}.png" for i in range(VIEWS)]
    (cam,) = d["cameras"].values()
    assert cam.model_name == "SIMPLE_RADIAL" and (cam.width, cam.height) == (WIDTH, HEIGHT)
    np.testing.assert_allclose(cam.params, [1.2 * WIDTH, WIDTH / 2, HEIGHT / 2, 0.0])
    assert not cam.has_prior_focal_length
    if version == "4":  # the 3.x layout has no rigs and frames: COLMAP makes trivial ones
        assert len(d["frames"]) == VIEWS and len(d["rigs"]) == 1
    with Reader(feats, "features") as r:
        for name, im in d["images"].items():
            f = r.read(name)
            # COLMAP puts the centre of the top-left pixel at (0.5, 0.5).
            np.testing.assert_array_equal(d["keypoints"][name], f["keypoints"] + 0.5)
            desc = d["descriptors"][name]
            assert desc.dtype == np.uint8 and desc.shape == (len(f["keypoints"]), 128)
            np.testing.assert_array_equal(desc, colmap_descriptors(f["descriptors"].T))
            assert im.camera_id == cam.camera_id

    ids = {n: im.image_id for n, im in d["images"].items()}
    pair_ids, stored = d["matches"]
    assert len(pair_ids) == n_pairs
    with pycolmap.Database.open(str(db_path)) as db:
        for a, b in exhaustive(sorted(ids)):
            m0, _ = read_matches(matches, a, b)
            expect = np.stack([np.nonzero(m0 >= 0)[0], m0[m0 >= 0]], 1)
            np.testing.assert_array_equal(db.read_matches(ids[a], ids[b]), expect)
            # The other order: the same pair id, the columns swapped.
            np.testing.assert_array_equal(db.read_matches(ids[b], ids[a]), expect[:, ::-1])
            pid = pycolmap.image_pair_to_pair_id(ids[a], ids[b])
            assert pid == pair_id(ids[a], ids[b]) == pair_id(ids[b], ids[a])
            assert pid == pycolmap.image_pair_to_pair_id(ids[b], ids[a]) and pid in pair_ids
            tvg = db.read_two_view_geometry(ids[a], ids[b])
            assert tvg.config in (
                pycolmap.TwoViewGeometryConfiguration.CALIBRATED,
                pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED,
            )
            inl = tvg.inlier_matches
            assert 30 < len(inl) <= len(expect)
            # Inliers are a subset of the matches.
            assert {tuple(r) for r in inl} <= {tuple(r) for r in expect}


def test_no_verify_and_per_image_cameras(scene: tuple[Path, Path, Path], tmp_path: Path) -> None:
    imgs, feats, matches = scene
    db_path = tmp_path / "nv.db"
    res = export_colmap(
        feats,
        matches,
        list_images(imgs),
        db_path,
        camera_mode="per-image",
        verify=False,
        colmap_version="4",
    )
    assert res.cameras == VIEWS and res.inlier_matches == res.matches
    d = _db(db_path)
    assert len(d["cameras"]) == VIEWS and len(d["rigs"]) == VIEWS
    assert len({im.camera_id for im in d["images"].values()}) == VIEWS
    for tvg in d["tvg"].values():
        assert tvg.config == pycolmap.TwoViewGeometryConfiguration.UNCALIBRATED
    pair_ids, stored = d["matches"]
    for pid, m in zip(pair_ids, stored, strict=True):
        np.testing.assert_array_equal(d["tvg"][pid].inlier_matches, m)
    assert "descriptors" not in d or not d["descriptors"]


def test_export_command_and_its_errors(
    scene: tuple[Path, Path, Path], tmp_path: Path, call_main: Callable[..., tuple[int, str, str]]
) -> None:
    imgs, feats, matches = scene
    db_path = tmp_path / "cli.db"
    args = ["export", "colmap", str(feats), str(matches), str(imgs), str(db_path)]
    code, out, err = call_main(*args, "--threads", "1")
    assert code == 0, err
    assert f"{VIEWS} images, 1 camera(s), 6 pairs" in out and db_path.is_file()

    # An existing database is refused without --overwrite, and kept.
    before = db_path.read_bytes()
    code, out, err = call_main(*args)
    assert code == OutputError.exit_code and "--overwrite" in err and "cli.db" in err
    assert db_path.read_bytes() == before
    code, out, err = call_main(*args, "--overwrite", "--no-verify")
    assert code == 0, err

    # Images missing from the features file: named in one clear line.
    more = tmp_path / "more"
    shutil.copytree(imgs, more)
    shutil.copy(more / "v0.png", more / "extra-1.png")
    shutil.copy(more / "v0.png", more / "extra-2.png")
    code, out, err = call_main(
        "export", "colmap", str(feats), str(matches), str(more), str(tmp_path / "x.db")
    )
    assert code == InputError.exit_code
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "extra-1.png" in err and "extra-2.png" in err
    assert "2 of the 6 images" in err and not (tmp_path / "x.db").exists()
    assert not (tmp_path / "x.db.part").exists()

    # A subset of the images: pairs with the others are skipped.
    sub = tmp_path / "sub"
    sub.mkdir()
    for n in ("v0.png", "v1.png"):
        shutil.copy(imgs / n, sub / n)
    res = export_colmap(feats, matches, list_images(sub), tmp_path / "sub.db", verify=False)
    assert (res.images, res.pairs, res.skipped_pairs) == (2, 1, 5)


def test_descriptors_must_be_128d(tmp_path: Path, scene: tuple[Path, Path, Path]) -> None:
    imgs, _, matches = scene
    feats = tmp_path / "f64.h5"
    with Writer(feats, "features", {"method": "test", "descriptor_dim": 64}) as w:
        for i in range(VIEWS):
            w.write(
                f"v{i}.png",
                {
                    "keypoints": np.zeros((3, 2), np.float32),
                    "descriptors": np.ones((64, 3), np.float32),
                    "image_size": np.array([WIDTH, HEIGHT], np.int32),
                },
            )
    with pytest.raises(InputError, match="64-D.*leave out --descriptors"):
        export_colmap(feats, matches, list_images(imgs), tmp_path / "d.db", descriptors=True)
    assert not (tmp_path / "d.db").exists()
    # Matches that index keypoints the features do not have are refused.
    with pytest.raises(InputError, match="do not fit"):
        export_colmap(feats, matches, list_images(imgs), tmp_path / "d.db")


def test_colmap_descriptors_scaling() -> None:
    d = np.zeros((2, 128), np.float32)
    d[0, 0] = 3.0  # a unit vector after normalisation: 512 clips to 255
    d[1, :4] = 0.5  # 0.5 each after normalisation: 256 clips to 255
    d[1, 4:] = 0.0
    out = colmap_descriptors(d)
    assert out.dtype == np.uint8 and out[0, 0] == 255 and out[0, 1:].max() == 0
    spread = np.full((1, 128), 1.0, np.float32)  # 1/sqrt(128) each: 512/11.31 = 45.25
    assert colmap_descriptors(spread)[0, 0] == 45


def _jpeg_with_focal(path: Path, focal35: int, order: str) -> None:
    """A JPEG with an EXIF APP1 segment holding FocalLengthIn35mmFilm in the Exif sub-IFD."""
    e = "<" if order == "II" else ">"
    ifd0 = struct.pack(e + "H", 1) + struct.pack(e + "HHII", 0x8769, 4, 1, 26) + b"\0\0\0\0"
    sub = (
        struct.pack(e + "H", 1)
        + struct.pack(e + "HHI", 0xA405, 3, 1)
        + struct.pack(e + "HH", focal35, 0)
        + b"\0\0\0\0"
    )
    tiff = order.encode() + struct.pack(e + "HI", 42, 8) + ifd0 + sub
    app1 = b"Exif\0\0" + tiff
    ok, enc = cv2.imencode(".jpg", np.full((60, 80), 128, np.uint8))
    assert ok
    data = enc.tobytes()
    path.write_bytes(data[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + data[2:])


@pytest.mark.parametrize("order", ["II", "MM"])
def test_exif_focal_length(tmp_path: Path, order: str) -> None:
    p = tmp_path / "exif.jpg"
    _jpeg_with_focal(p, 28, order)
    assert exif_focal_35mm(p) == 28.0
    assert cv2.imread(str(p)) is not None
    f, prior = focal_prior(p, 80, 60)
    assert prior and f == pytest.approx(28 / FILM_DIAGONAL_MM * 100)
    plain = tmp_path / "plain.png"
    cv2.imwrite(str(plain), np.zeros((60, 80), np.uint8))
    assert exif_focal_35mm(plain) is None
    assert focal_prior(plain, 80, 60) == (96.0, False)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe1\x00\x10Exif\0\0MM\0*garbage")
    assert exif_focal_35mm(tmp_path / "bad.jpg") is None


def test_exif_focal_goes_into_the_camera(tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    _jpeg_with_focal(imgs / "a.jpg", 50, "II")
    cv2.imwrite(str(imgs / "b.png"), np.zeros((60, 80), np.uint8))
    feats, matches = tmp_path / "f.h5", tmp_path / "m.h5"
    with Writer(feats, "features", {"method": "test", "descriptor_dim": 128}) as w:
        for n in ("a.jpg", "b.png"):
            w.write(
                n,
                {
                    "keypoints": np.zeros((0, 2), np.float32),
                    "descriptors": np.zeros((128, 0), np.float32),
                    "image_size": np.array([80, 60], np.int32),
                },
            )
    with Writer(matches, "matches", {"method": "test"}) as w:
        w.write(
            "a.jpg/b.png",
            {"matches0": np.zeros(0, np.int32), "matching_scores0": np.zeros(0, np.float32)},
        )
    export_colmap(feats, matches, list_images(imgs), tmp_path / "e.db", "per-image")
    cams = {c.camera_id: c for c in _db(tmp_path / "e.db")["cameras"].values()}
    by_name = {n: cams[im.camera_id] for n, im in _db(tmp_path / "e.db")["images"].items()}
    assert by_name["a.jpg"].has_prior_focal_length
    assert by_name["a.jpg"].params[0] == pytest.approx(50 / FILM_DIAGONAL_MM * 100)
    assert not by_name["b.png"].has_prior_focal_length and by_name["b.png"].params[0] == 96.0


def test_missing_pycolmap_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, call_main: Callable[..., tuple[int, str, str]]
) -> None:
    monkeypatch.setitem(sys.modules, "pycolmap", None)  # import pycolmap -> ImportError
    for args in (
        ["export", "colmap", "f.h5", "m.h5", str(tmp_path), "d.db"],
        ["sfm", str(tmp_path), str(tmp_path / "out")],
    ):
        code, out, err = call_main(*args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1, err
        assert "pip install 'descmatch[sfm]'" in err


# -- the COLMAP command line -----------------------------------------------------------------
COLMAP = shutil.which("colmap")
needs_colmap = pytest.mark.skipif(
    COLMAP is None,
    reason="the colmap program is not installed (Debian/Ubuntu: apt-get install colmap)",
)


def _colmap(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.run(
        [str(COLMAP), *args], capture_output=True, text=True, env=env, timeout=300
    )


def _colmap_version() -> tuple[int, int]:
    m = re.search(r"COLMAP (\d+)\.(\d+)", _colmap("help").stdout)
    assert m, "colmap help names no version"
    return int(m[1]), int(m[2])


def test_colmap3_layout_on_disk(scene: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """The 3.x database read with sqlite3 alone: COLMAP 3.8's tables and columns, keypoints
    +0.5 as float32 blobs, matches as uint32 (N,2) under pair_id = id1 * 2147483647 + id2."""
    imgs, feats, matches = scene
    db_path = tmp_path / "c3.db"
    export_colmap(feats, matches, list_images(imgs), db_path, descriptors=True, num_threads=1)
    con = sqlite3.connect(db_path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables - {"sqlite_sequence"} == {
        "cameras",
        "images",
        "keypoints",
        "descriptors",
        "matches",
        "two_view_geometries",
    }
    cols = {t: [r[1] for r in con.execute(f"PRAGMA table_info({t})")] for t in tables}
    assert cols["images"][:4] == ["image_id", "name", "camera_id", "prior_qw"]
    assert cols["descriptors"] == ["image_id", "rows", "cols", "data"]
    ids = dict(con.execute("SELECT name, image_id FROM images"))
    with Reader(feats, "features") as r:
        for name, image_id in ids.items():
            rows, ncols, blob = con.execute(
                "SELECT rows, cols, data FROM keypoints WHERE image_id = ?", (image_id,)
            ).fetchone()
            kp = np.frombuffer(blob, np.float32).reshape(rows, ncols)[:, :2]
            np.testing.assert_array_equal(kp, r.read(name)["keypoints"] + 0.5)
    a, b = "v0.png", "v2.png"
    rows, ncols, blob = con.execute(
        "SELECT rows, cols, data FROM matches WHERE pair_id = ?",
        (ids[a] * 2147483647 + ids[b],),
    ).fetchone()
    m0, _ = read_matches(matches, a, b)
    expect = np.stack([np.nonzero(m0 >= 0)[0], m0[m0 >= 0]], 1)
    np.testing.assert_array_equal(np.frombuffer(blob, np.uint32).reshape(rows, ncols), expect)
    con.close()


@needs_colmap
def test_colmap_mapper_reads_the_export(
    scene: tuple[Path, Path, Path], tmp_path: Path, call_main: Callable[..., tuple[int, str, str]]
) -> None:
    """The installed colmap program maps the exported database (default layout): every view
    registered, points triangulated; pycolmap reads the same file afterwards."""
    imgs, feats, matches = scene
    db_path = tmp_path / "database.db"
    code, out, err = call_main(
        "export", "colmap", str(feats), str(matches), str(imgs), str(db_path), "--threads", "1"
    )
    assert code == 0, err
    assert "COLMAP 3.x layout" in out
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    run = _colmap(
        "mapper",
        "--database_path",
        str(db_path),
        "--image_path",
        str(imgs),
        "--output_path",
        str(sparse),
        "--Mapper.num_threads",
        "1",
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rec = pycolmap.Reconstruction(str(sparse / "0"))
    assert rec.num_reg_images() == VIEWS and rec.num_points3D() > 300
    assert rec.compute_mean_reprojection_error() < 1.0
    assert sorted(im.name for im in rec.images.values()) == [f"v{i}.png" for i in range(VIEWS)]
    # pycolmap (descmatch sfm's mapper) reads the same database.
    with pycolmap.Database.open(str(db_path)) as db:
        assert db.num_images() == VIEWS and len(db.read_all_matches()[0]) == 6


@needs_colmap
def test_colmap_4_layout_and_an_old_colmap(
    scene: tuple[Path, Path, Path], tmp_path: Path, call_main: Callable[..., tuple[int, str, str]]
) -> None:
    """--colmap-version 4 writes pycolmap's layout, and says what to do where an older
    colmap stops on it; a colmap older than 3.12 does stop on it."""
    imgs, feats, matches = scene
    db_path = tmp_path / "database4.db"
    args = ["export", "colmap", str(feats), str(matches), str(imgs), str(db_path)]
    code, out, err = call_main(*args, "--colmap-version", "4", "--threads", "1")
    assert code == 0, err
    assert "--colmap-version 3" in out and not is_colmap3(db_path)
    if _colmap_version() < (3, 12):
        sparse = tmp_path / "sparse"
        sparse.mkdir()
        run = _colmap(
            "mapper",
            "--database_path",
            str(db_path),
            "--image_path",
            str(imgs),
            "--output_path",
            str(sparse),
        )
        assert run.returncode != 0 and "SQL logic error" in run.stdout + run.stderr
    code, out, err = call_main(*args, "--colmap-version", "2", "--overwrite")
    assert code != 0 and "2" in err
