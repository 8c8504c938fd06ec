"""The mutual nearest neighbour + ratio matcher against a brute-force numpy reference, its
edge cases, and the match stage (features.h5 + pairs -> matches.h5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_scenes

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import InputError, SchemaError
from descmatch.extract import extract
from descmatch.h5 import Reader, pair_key, read_features, read_matches
from descmatch.images import list_images
from descmatch.match import DEFAULT_RATIO, match, match_descriptors
from descmatch.pairs import exhaustive, pairs_from_spec, read_pairs, sequential


def reference(a: np.ndarray, b: np.ndarray, ratio: float | None, mutual: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force in float64: matches, scores, and a mask of rows whose outcome is decided
    by a margin far above float32 rounding (the rows a float32 matcher must get right)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = ((a64[:, None, :] - b64[None, :, :]) ** 2).sum(-1)  # squared distances
    d[np.isnan(d)] = np.inf
    n0, n1 = d.shape
    m = np.full(n0, -1, np.int64)
    s = np.zeros(n0, np.float32)
    clear = np.ones(n0, bool)
    if n0 == 0 or n1 == 0:
        return m, s, clear
    order = np.argsort(d, axis=1, kind="stable")
    rows = np.arange(n0)
    nn = order[:, 0]
    d1 = d[rows, nn]
    d2 = d[rows, order[:, 1]] if n1 > 1 else np.full(n0, np.inf)
    ok = np.isfinite(d1)
    eps = 1e-4
    if ratio is not None:
        ok &= np.sqrt(d1) < ratio * np.sqrt(d2)
        with np.errstate(invalid="ignore"):
            margin = np.abs(np.sqrt(d1) - ratio * np.sqrt(d2))
        clear &= ~(np.isfinite(d2) & (margin < eps))
    if n1 > 1:
        clear &= ~(np.isfinite(d1) & (d2 - d1 < eps))  # nearest must be unambiguous
    if mutual:
        col_best = np.argmin(d, axis=0)
        ok &= col_best[nn] == rows
        col_sorted = np.sort(d, axis=0)
        if n0 > 1:
            gap = col_sorted[1] - col_sorted[0]
            clear &= ~(np.isfinite(col_sorted[0][nn]) & (gap[nn] < eps))
    m[ok] = nn[ok]
    s[ok] = 1.0 - d1[ok] / 2.0
    return m, s, clear


def descriptors(n0: int, n1: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit descriptors: half of desc0 are noisy copies of desc1 rows, the rest random."""
    rng = np.random.default_rng(seed)
    b = rng.normal(size=(n1, dim)).astype(np.float32)
    a = rng.normal(size=(n0, dim)).astype(np.float32)
    k = min(n0, n1) // 2
    a[:k] = b[rng.permutation(n1)[:k]] + 0.25 * rng.normal(size=(k, dim)).astype(np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return a, b


def run(a: np.ndarray, b: np.ndarray, **kw: object) -> tuple[np.ndarray, np.ndarray]:
    m, s = match_descriptors(torch.from_numpy(a), torch.from_numpy(b), **kw)  # type: ignore[arg-type]
    assert m.dtype == torch.long and s.dtype == torch.float32
    assert m.shape == (a.shape[0],) and s.shape == (a.shape[0],)
    return m.numpy(), s.numpy()


SIZES = [(1, 5, 8), (5, 1, 8), (2, 2, 4), (40, 30, 16), (120, 200, 128), (257, 101, 32)]


@pytest.mark.parametrize("n0,n1,dim", SIZES)
@pytest.mark.parametrize("ratio", [None, 0.8, DEFAULT_RATIO])
@pytest.mark.parametrize("mutual", [True, False])
def test_matches_brute_force_reference(n0: int, n1: int, dim: int, ratio: float | None,
                                       mutual: bool) -> None:
    a, b = descriptors(n0, n1, dim, seed=n0 * 1000 + n1)
    ref_m, ref_s, clear = reference(a, b, ratio, mutual)
    assert clear.mean() > 0.9
    for max_elements in (1 << 26, 37, 1):  # one chunk, many chunks, one row per chunk
        m, s = run(a, b, ratio=ratio, mutual=mutual, max_elements=max_elements)
        np.testing.assert_array_equal(m[clear], ref_m[clear])
        np.testing.assert_allclose(s[clear], ref_s[clear], atol=1e-5)
        assert np.all(s[m < 0] == 0)
        assert np.all((m >= -1) & (m < n1))


def test_reference_cases_are_not_trivial() -> None:
    """The random sets above hold both matches and rejections of each kind."""
    a, b = descriptors(257, 101, 32, seed=257 * 1000 + 101)
    plain, _, _ = reference(a, b, None, False)
    ratio, _, _ = reference(a, b, DEFAULT_RATIO, False)
    both, _, _ = reference(a, b, DEFAULT_RATIO, True)
    assert (plain >= 0).all()
    assert 20 < (ratio >= 0).sum() < len(a) - 20
    assert 10 < (both >= 0).sum() < (ratio >= 0).sum()


@pytest.mark.parametrize("max_elements", [37, 100, 999, 5000])
def test_chunking_gives_identical_results(max_elements: int) -> None:
    a, b = descriptors(300, 250, 64, seed=7)
    m_ref, s_ref = run(a, b)
    m, s = run(a, b, max_elements=max_elements)
    np.testing.assert_array_equal(m, m_ref)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-6)  # BLAS rounding only


def test_mutual_check_across_chunks() -> None:
    """Row 0 and row 5 both have column 0 as nearest; the better one (row 5) is in a later
    chunk, so the column minimum must be carried across chunks."""
    b = np.eye(4, dtype=np.float32)
    a = np.full((6, 4), 0.0, np.float32)
    a[:, 3] = 1.0  # rows 1..4 are closest to column 3
    a[0] = [0.8, 0.6, 0.0, 0.0]
    a[5] = [0.99, 0.14, 0.0, 0.0]
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    for max_elements in (1 << 26, 4, 8):
        m, _ = run(a, b, ratio=None, mutual=True, max_elements=max_elements)
        assert m[0] == -1 and m[5] == 0, max_elements
        m, _ = run(a, b, ratio=None, mutual=False, max_elements=max_elements)
        assert m[0] == 0 and m[5] == 0


def test_identical_descriptors_match_with_score_one() -> None:
    a, _ = descriptors(50, 50, 32, seed=1)
    perm = np.random.default_rng(2).permutation(50)
    m, s = run(a, a[perm])
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(m, inverse)
    np.testing.assert_allclose(s, 1.0, atol=1e-5)


def test_scores_are_cosine_similarity_for_unit_descriptors() -> None:
    a, b = descriptors(80, 60, 16, seed=3)
    m, s = run(a, b, ratio=None, mutual=False)
    cos = (a * b[m]).sum(1)
    np.testing.assert_allclose(s, cos, atol=1e-5)


@pytest.mark.parametrize("n0,n1", [(0, 10), (10, 0), (0, 0)])
def test_zero_keypoints_on_either_side(n0: int, n1: int) -> None:
    a = np.zeros((n0, 128), np.float32)
    b = np.zeros((n1, 128), np.float32)
    m, s = run(a, b)
    assert m.shape == (n0,) and s.shape == (n0,)
    assert (m == -1).all() and (s == 0).all()


def test_single_candidate_passes_ratio_but_not_mutual() -> None:
    a, b = descriptors(6, 1, 16, seed=4)
    m, _ = run(a, b, ratio=0.5, mutual=False)  # no second neighbour: ratio passes
    assert (m == 0).all()
    m, _ = run(a, b, ratio=0.5, mutual=True)  # only the closest row keeps it
    d = ((a - b[0]) ** 2).sum(1)
    expected = np.full(6, -1)
    expected[np.argmin(d)] = 0
    np.testing.assert_array_equal(m, expected)


def test_single_query_row() -> None:
    a, b = descriptors(1, 20, 16, seed=5)
    b[7] = a[0] * 0.999 + 0.001
    b[7] /= np.linalg.norm(b[7])
    m, _ = run(a, b)
    assert m.tolist() == [7]


def test_duplicate_candidates_fail_the_ratio_test() -> None:
    a, b = descriptors(10, 12, 32, seed=6)
    b[3] = a[2]
    b[9] = a[2]  # two identical candidates for row 2
    m, _ = run(a, b, ratio=0.99, mutual=False)
    assert m[2] == -1
    m, _ = run(a, b, ratio=0.99, mutual=True)
    assert m[2] == -1
    m, _ = run(a, b, ratio=None, mutual=False)  # without the ratio test it matches one
    assert m[2] in (3, 9)


def test_nan_rows_never_match() -> None:
    a, b = descriptors(30, 30, 16, seed=8)
    b_copy = a[np.random.default_rng(0).permutation(30)].copy()
    a[4] = np.nan
    a[11, 3] = np.nan
    b_copy[0] = np.nan
    for ratio, mutual in [(None, False), (None, True), (DEFAULT_RATIO, True)]:
        for max_elements in (1 << 26, 37):
            m, s = run(a, b_copy, ratio=ratio, mutual=mutual, max_elements=max_elements)
            assert m[4] == -1 and m[11] == -1 and s[4] == 0 and s[11] == 0
            assert 0 not in m.tolist()  # the NaN column is nobody's match
            assert np.isfinite(s).all()
            assert (m >= 0).sum() >= 25


def test_all_nan_gives_no_matches() -> None:
    a = np.full((5, 8), np.nan, np.float32)
    b = np.ones((4, 8), np.float32)
    m, s = run(a, b)
    assert (m == -1).all() and (s == 0).all()


def test_different_descriptor_sizes_raise() -> None:
    with pytest.raises(ValueError, match="128.*64|64.*128"):
        match_descriptors(torch.zeros(3, 128), torch.zeros(4, 64))


def test_half_precision_inputs() -> None:
    a, b = descriptors(60, 50, 32, seed=9)
    m32, _ = run(a, b)
    m16, s16 = match_descriptors(torch.from_numpy(a).half(), torch.from_numpy(b).half())
    assert s16.dtype == torch.float32
    assert (m16.numpy() == m32).mean() > 0.95


# -- the match stage -------------------------------------------------------------------------
def test_match_stage_writes_what_the_matcher_finds(example_features: Path, tmp_path: Path
                                                   ) -> None:
    names = ["view1.jpg", "view2.jpg", "view3.jpg"]
    out = tmp_path / "matches.h5"
    res = match(example_features, exhaustive(names), out)
    assert res.pairs == 3 and res.matched == 3 and res.skipped == 0
    assert res.pairs_path == tmp_path / "matches-pairs.txt"
    assert read_pairs(res.pairs_path) == exhaustive(names)
    with Reader(out, "matches") as r:
        assert sorted(r.keys) == sorted(pair_key(a, b) for a, b in exhaustive(names))
        assert r.attrs["features"] == example_features.name
        assert r.attrs["method"] == "rootsift"
        assert r.settings == {"ratio": DEFAULT_RATIO, "mutual": True}
    for a, b in exhaustive(names):
        m, s = read_matches(out, a, b)
        assert m.dtype == np.int32 and s.dtype == np.float32
        d0 = read_features(example_features, a)["descriptors"].T
        d1 = read_features(example_features, b)["descriptors"].T
        assert m.shape == (d0.shape[0],)
        m_ref, s_ref = run(np.ascontiguousarray(d0), np.ascontiguousarray(d1))
        np.testing.assert_array_equal(m, m_ref)
        np.testing.assert_allclose(s, s_ref)
        assert (m >= 0).sum() > 100
    with pytest.raises(InputError, match="other way round"):
        read_matches(out, "view2.jpg", "view1.jpg")


def test_match_stage_resumes_and_checks_settings(example_features: Path, tmp_path: Path
                                                 ) -> None:
    names = ["view1.jpg", "view2.jpg", "view3.jpg"]
    out = tmp_path / "m.h5"
    first = match(example_features, sequential(names, 1), out)
    assert first.matched == 2
    before = out.read_bytes()
    again = match(example_features, sequential(names, 1), out)
    assert again.matched == 0 and again.skipped == 2
    assert out.read_bytes() == before
    # Reversed pairs count as done; the missing pair is added.
    more = match(example_features, [("view2.jpg", "view1.jpg"), ("view1.jpg", "view3.jpg")],
                 out)
    assert more.skipped == 1 and more.matched == 1
    with Reader(out, "matches") as r:
        assert len(r.keys) == 3
    with pytest.raises(SchemaError, match="settings"):
        match(example_features, exhaustive(names), out, ratio=0.5)
    assert len(Reader(out, "matches").keys) == 3


def test_match_stage_rejects_unknown_images(
        example_features: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.jpg"):
        match(example_features, [("view1.jpg", "nope.jpg")], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_match_stage_with_nested_image_names(tmp_path: Path) -> None:
    write_scenes(tmp_path / "imgs" / "a", 1, first_seed=3)
    write_scenes(tmp_path / "imgs" / "b", 1, first_seed=3)  # the same scene
    feats = tmp_path / "f.h5"
    extract(list_images(tmp_path / "imgs"), feats, build_describer("rootsift"),
            SiftDetector(max_keypoints=100))
    out = tmp_path / "m.h5"
    match(feats, [("a/img0.png", "b/img0.png")], out)
    with Reader(out, "matches") as r:
        assert r.keys == ["a-img0.png/b-img0.png"]
    m, s = read_matches(out, "a/img0.png", "b/img0.png")
    assert (m >= 0).sum() > 80  # identical images: nearly every keypoint matches itself
    assert (m[m >= 0] == np.nonzero(m >= 0)[0]).all()


def test_pairs_specs() -> None:
    names = ["a", "b", "c", "d"]
    assert pairs_from_spec("exhaustive", names) == exhaustive(names)
    assert len(exhaustive(names)) == 6
    assert pairs_from_spec("sequential:1", names) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert pairs_from_spec("sequential:2", names) == [("a", "b"), ("a", "c"), ("b", "c"),
                                                      ("b", "d"), ("c", "d")]
    assert pairs_from_spec("sequential", names) == exhaustive(names)  # default window 5
    for bad in ("sequential:0", "sequential:x", "no-such-pairs-file.txt"):
        with pytest.raises(InputError, match=bad.split(":")[0]):
            pairs_from_spec(bad, names)
