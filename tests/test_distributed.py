"""Sharded extract and match: ``torchrun --nproc_per_node 2 -m descmatch extract|match`` on the
CPU (gloo) writes one valid HDF5 file equal to a single-process run's, and part files left by
killed ranks (of any number of processes) are picked up by the next run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_scenes

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.distributed import Dist, launch_env
from descmatch.extract import extract
from descmatch.h5 import Reader, Shard, Writer, leftover_parts, part_path
from descmatch.images import list_images


def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m descmatch ...`` (torchrun is
    ``python -m torch.distributed.run``: the same interpreter as the tests)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "descmatch",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def contents(path: Path, kind: str) -> dict[str, dict[str, np.ndarray]]:
    with Reader(path, kind) as r:
        return {k: r.read(k) for k in r.keys}


def assert_same_groups(a: Path, b: Path, kind: str) -> None:
    ca, cb = contents(a, kind), contents(b, kind)
    assert sorted(ca) == sorted(cb)
    for key in ca:
        assert sorted(ca[key]) == sorted(cb[key]), key
        for name in ca[key]:
            np.testing.assert_array_equal(ca[key][name], cb[key][name], err_msg=f"{key}/{name}")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    write_scenes(folder, 5, width=160, height=120)
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def test_two_processes_extract_and_match_into_one_file_equal_to_one_process(
    images: Path, tmp_path: Path
) -> None:
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(list_images(images), one, build_describer("rootsift"), SiftDetector(max_keypoints=80))
    res = torchrun(
        "extract",
        str(images),
        str(two),
        "--method",
        "rootsift",
        "--max-keypoints",
        "80",
        "--device",
        "cpu",
        "--verbose",
    )
    out = res.stdout
    for rank in (0, 1):  # the six pending files (one unreadable) split 3 + 3
        assert f"rank {rank} of 2: 3 of 6 images" in res.stderr
    assert out.count("image(s) in") == 1  # rank 0 alone reports, with the run's totals
    assert "5 image(s)" in out and "1 unreadable" in out and out.count("skipped broken.png") == 1
    assert_same_groups(one, two, "features")
    with h5py.File(two, "r") as f:
        assert f.attrs["method"] == "rootsift"
    assert leftover_parts(two) == [] and not two.with_name("two.h5.tmp").exists()

    m_one, m_two = tmp_path / "m1.h5", tmp_path / "m2.h5"
    from descmatch.match import match
    from descmatch.pairs import pairs_for

    with Reader(one, "features") as r:
        names = sorted(r.keys)
    pairs = pairs_for("exhaustive", names, one)
    match(one, pairs, m_one)
    res = torchrun("match", str(two), str(m_two), "--pairs", "exhaustive", "--device", "cpu", "-v")
    assert "rank 0 of 2: 5 of 10 pairs" in res.stderr
    assert "rank 1 of 2: 5 of 10 pairs" in res.stderr
    assert res.stdout.count("pair(s) matched") == 1 and "10 pair(s) matched" in res.stdout
    assert_same_groups(m_one, m_two, "matches")
    assert (tmp_path / "m2-pairs.txt").read_text() == (tmp_path / "m1-pairs.txt").read_text()
    assert leftover_parts(m_two) == []

    # A second run has nothing left to do on any rank, and keeps the file as it is.
    res = torchrun("match", str(two), str(m_two), "--pairs", "exhaustive", "--device", "cpu")
    assert "0 pair(s) matched" in res.stdout and "10 already done" in res.stdout
    assert_same_groups(m_one, m_two, "matches")


def write_killed_rank_part(
    out: Path, rank: int, world: int, names: list[str], folder: Path
) -> None:
    """What a killed rank leaves: its part file with complete groups, never merged."""
    describer = build_describer("rootsift")
    det = SiftDetector(max_keypoints=80)
    ref = out.with_name("ref-" + out.name)
    extract(list_images(folder), ref, describer, det)
    attrs = {k: v for k, v in h5py.File(ref, "r").attrs.items()}
    w = Writer(out, "features", attrs, shard=Shard(rank, world))
    for name in names:
        w.write(name, contents(ref, "features")[name])
    assert w._part is not None
    w._part.close()  # killed: no close(), no merge
    w._part = None


def test_a_killed_ranks_part_is_resumed_by_a_single_process(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    write_killed_rank_part(out, 1, 2, ["img1.png", "img3.png"], images)
    assert leftover_parts(out) == [part_path(out, 1)] and not out.exists()
    res = extract(
        list_images(images), out, build_describer("rootsift"), SiftDetector(max_keypoints=80)
    )
    assert res.skipped_existing == 2 and res.images == 3
    assert leftover_parts(out) == []
    assert_same_groups(out, out.with_name("ref-f.h5"), "features")


def test_leftover_parts_of_another_world_size_are_resumed_under_torchrun(
    images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f.h5"
    write_killed_rank_part(out, 2, 3, ["img0.png"], images)  # from a 3-process run
    res = torchrun(
        "extract",
        str(images),
        str(out),
        "--method",
        "rootsift",
        "--max-keypoints",
        "80",
        "--device",
        "cpu",
    )
    assert "4 image(s)" in res.stdout and "1 already done" in res.stdout
    assert leftover_parts(out) == []
    assert_same_groups(out, out.with_name("ref-f.h5"), "features")


def test_overwrite_discards_leftover_parts(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "f.h5"
    write_killed_rank_part(out, 1, 2, ["img1.png"], images)
    res = extract(
        list_images(images),
        out,
        build_describer("rootsift"),
        SiftDetector(max_keypoints=80),
        overwrite=True,
    )
    assert res.skipped_existing == 0 and res.images == 5 and leftover_parts(out) == []


def test_a_leftover_part_with_other_settings_is_refused(images: Path, tmp_path: Path) -> None:
    from descmatch.errors import SchemaError

    out = tmp_path / "f.h5"
    write_killed_rank_part(out, 1, 2, ["img1.png"], images)
    with pytest.raises(
        SchemaError, match=r"f\.h5\.rank1\.part: holds other settings: max_keypoints"
    ):
        extract(
            list_images(images), out, build_describer("rootsift"), SiftDetector(max_keypoints=50)
        )
    assert part_path(out, 1).exists()  # nothing lost


def test_part_names_sort_by_rank_and_survive_glob_characters(tmp_path: Path) -> None:
    out = tmp_path / "a[1]*.h5"
    for r in (10, 2, 0):
        part_path(out, r).write_bytes(b"")
    (tmp_path / "a[1]*.h5.rankx.part").write_bytes(b"")  # not a part of ours
    (tmp_path / "b.h5.rank1.part").write_bytes(b"")
    assert leftover_parts(out) == [part_path(out, 0), part_path(out, 2), part_path(out, 10)]


def test_shards_cover_every_item_once() -> None:
    items = list(range(11))
    parts = [Dist(r, 3, True).shard(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items and Dist().shard(items) == items


def test_launch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert launch_env() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launch_env() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch_env() == (3, 4, 1)
