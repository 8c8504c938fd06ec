"""The Brown/PhotoTour reader on a synthetic dataset written by fixtures_brown."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from fixtures_brown import (
    brown_fixture_pairs,
    brown_fixture_patches,
    make_brown_fixture,
    write_pairs_file,
)

from descmatch.errors import ConfigError, InputError
from descmatch.train.brown import BrownDataset

N_POINTS, PER_POINT = 100, 3  # 300 patches: a full first bmp and a partly filled second one


@pytest.fixture(scope="module")
def brown_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_brown_fixture(tmp_path_factory.mktemp("brown") / "synthetic", N_POINTS, PER_POINT)


@pytest.fixture(scope="module")
def expected() -> tuple[np.ndarray, np.ndarray]:
    return brown_fixture_patches(N_POINTS, PER_POINT)


@pytest.fixture
def copy_root(brown_root: Path, tmp_path: Path) -> Path:
    """A private copy of the dataset that a test may damage."""
    return Path(shutil.copytree(brown_root, tmp_path / "copy"))


def test_fixture_layout(brown_root: Path) -> None:
    names = sorted(p.name for p in brown_root.iterdir())
    assert names == ["info.txt", "m50_00600_00600_0.txt", "patch0000.bmp", "patch0001.bmp"]
    img = cv2.imread(str(brown_root / "patch0001.bmp"), cv2.IMREAD_GRAYSCALE)
    assert img.shape == (1024, 1024)
    # 300 - 256 = 44 patches in the second grid: rows 0-1 full, row 2 has 12; the rest is zero.
    assert img[3 * 64 :].max() == 0
    assert img[2 * 64 : 3 * 64, 12 * 64 :].max() == 0
    assert img[2 * 64 : 3 * 64, 11 * 64 : 12 * 64].max() > 0


def test_count_and_ids(brown_root: Path, expected: tuple[np.ndarray, np.ndarray]) -> None:
    ds = BrownDataset(brown_root)
    assert len(ds) == N_POINTS * PER_POINT
    assert ds.num_total == len(ds)
    assert ds.point_ids.dtype == np.int64
    np.testing.assert_array_equal(ds.point_ids, expected[1])
    assert ds.patches.dtype == np.uint8
    assert ds.patches.shape == (300, 32, 32)


def test_patches_at_64_equal_what_was_written(
    brown_root: Path, expected: tuple[np.ndarray, np.ndarray]
) -> None:
    ds = BrownDataset(brown_root, patch_size=64)
    assert ds.patches.shape == (300, 64, 64)
    np.testing.assert_array_equal(ds.patches, expected[0])


def test_grid_order_is_row_major(brown_root: Path) -> None:
    """Patch k sits in file k // 256 at row (k % 256) // 16, column (k % 256) % 16."""
    ds = BrownDataset(brown_root, patch_size=64)
    for k in (0, 1, 15, 16, 17, 255, 256, 273, 299):
        img = cv2.imread(str(brown_root / f"patch{k // 256:04d}.bmp"), cv2.IMREAD_GRAYSCALE)
        r, c = (k % 256) // 16, (k % 256) % 16
        cell = img[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64]
        np.testing.assert_array_equal(ds.patches[k], cell)


def test_resize_to_32_is_area_average(
    brown_root: Path, expected: tuple[np.ndarray, np.ndarray]
) -> None:
    ds = BrownDataset(brown_root, patch_size=32)
    patches64 = expected[0]
    per_patch = np.stack([cv2.resize(p, (32, 32), interpolation=cv2.INTER_AREA) for p in patches64])
    np.testing.assert_array_equal(ds.patches, per_patch)
    block_mean = patches64.reshape(-1, 32, 2, 32, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(ds.patches - block_mean).max() <= 0.5 + 1e-9


def test_max_patches(brown_root: Path, expected: tuple[np.ndarray, np.ndarray]) -> None:
    ds = BrownDataset(brown_root, patch_size=64, max_patches=50)
    assert len(ds) == 50 and ds.num_total == 300
    np.testing.assert_array_equal(ds.patches, expected[0][:50])
    np.testing.assert_array_equal(ds.point_ids, expected[1][:50])
    idx0, idx1, _ = ds.pairs()
    assert len(idx0) > 0
    assert idx0.max() < 50 and idx1.max() < 50
    # max_patches alone does not need the second bmp
    ds = BrownDataset(brown_root, max_patches=256)
    assert len(ds) == 256


def test_pairs(brown_root: Path, expected: tuple[np.ndarray, np.ndarray]) -> None:
    ds = BrownDataset(brown_root)
    idx0, idx1, is_match = ds.pairs()
    idx, want_match = brown_fixture_pairs(expected[1])
    assert idx0.dtype == np.int64 and idx1.dtype == np.int64 and is_match.dtype == bool
    np.testing.assert_array_equal(idx0, idx[:, 0])
    np.testing.assert_array_equal(idx1, idx[:, 1])
    np.testing.assert_array_equal(is_match, want_match)
    # 100 points x 3 same-point pairs each, and as many non-matching pairs
    assert len(is_match) == 600 and is_match.sum() == 300
    np.testing.assert_array_equal(is_match, ds.point_ids[idx0] == ds.point_ids[idx1])


def test_pairs_parse_hand_written_file(copy_root: Path) -> None:
    (copy_root / "m50_00003_00003_0.txt").write_text(
        "4 1 0 5 1 0 0\n\n7 2 0 9 3 0 0\n  10 3 11 299 99 12 0  \n"
    )
    ds = BrownDataset(copy_root)
    idx0, idx1, is_match = ds.pairs("m50_00003_00003_0.txt")
    assert idx0.tolist() == [4, 7, 10]
    assert idx1.tolist() == [5, 9, 299]
    assert is_match.tolist() == [True, False, False]
    # the name may leave out .txt; the default is still the largest file
    assert ds.pairs("m50_00003_00003_0")[0].tolist() == [4, 7, 10]
    assert ds.pair_files() == ["m50_00600_00600_0.txt", "m50_00003_00003_0.txt"]
    assert len(ds.pairs()[0]) == 600


def test_default_pairs_is_largest(copy_root: Path, expected: tuple[np.ndarray, np.ndarray]) -> None:
    idx, _ = brown_fixture_pairs(expected[1])
    write_pairs_file(copy_root / "m50_01000_01000_0.txt", idx[:10], expected[1])
    write_pairs_file(copy_root / "m50_00020_00020_0.txt", idx[:20], expected[1])
    ds = BrownDataset(copy_root)
    assert ds.pair_files()[0] == "m50_01000_01000_0.txt"
    assert len(ds.pairs()[0]) == 10
    assert len(ds.pairs("m50_00020_00020_0")[0]) == 20


def test_missing_info(copy_root: Path) -> None:
    (copy_root / "info.txt").unlink()
    with pytest.raises(InputError, match="info.txt"):
        BrownDataset(copy_root)


def test_truncated_bmp_list(copy_root: Path) -> None:
    (copy_root / "patch0001.bmp").unlink()
    with pytest.raises(InputError, match="patch0001.bmp") as err:
        BrownDataset(copy_root)
    assert "\n" not in str(err.value)
    assert "300 patches" in str(err.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope"):
        BrownDataset(tmp_path / "nope")


def test_malformed_info_line(copy_root: Path) -> None:
    lines = (copy_root / "info.txt").read_text().splitlines()
    lines[6] = "7 x"
    (copy_root / "info.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"info\.txt:7"):
        BrownDataset(copy_root)
    lines[6] = "7"
    (copy_root / "info.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"info\.txt:7"):
        BrownDataset(copy_root)


def test_malformed_pairs_line(copy_root: Path) -> None:
    (copy_root / "m50_00002_00002_0.txt").write_text("1 0 0 2 0 0 0\n1 0 0 2 0\n")
    ds = BrownDataset(copy_root)
    with pytest.raises(InputError, match=r"m50_00002_00002_0\.txt:2"):
        ds.pairs("m50_00002_00002_0.txt")
    with pytest.raises(InputError, match="m50_00009"):
        ds.pairs("m50_00009_00009_0.txt")


def test_pairs_out_of_range(copy_root: Path) -> None:
    (copy_root / "m50_00001_00001_0.txt").write_text("1 0 0 300 100 0 0\n")
    with pytest.raises(InputError, match="patch 300"):
        BrownDataset(copy_root).pairs("m50_00001_00001_0.txt")


def test_no_pairs_file(copy_root: Path) -> None:
    (copy_root / "m50_00600_00600_0.txt").unlink()
    with pytest.raises(InputError, match="m50"):
        BrownDataset(copy_root).pairs()


def test_bad_bmp(copy_root: Path) -> None:
    cv2.imwrite(str(copy_root / "patch0000.bmp"), np.zeros((512, 1024), np.uint8))
    with pytest.raises(InputError, match="patch0000.bmp"):
        BrownDataset(copy_root)
    (copy_root / "patch0000.bmp").write_bytes(b"BM not really")
    with pytest.raises(InputError, match="patch0000.bmp"):
        BrownDataset(copy_root)


def test_unsupported_patch_size(brown_root: Path) -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        BrownDataset(brown_root, patch_size=48)
