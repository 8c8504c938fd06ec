"""The mutual nearest neighbour + ratio matcher against a brute-force numpy reference, its
edge cases, and the match stage (features.h5 + pairs -> matches.h5)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_scenes

import descmatch.matcher_reduced as match_module
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import InputError, SchemaError
from descmatch.extract import extract
from descmatch.h5 import Reader, pair_key, read_features, read_matches
from descmatch.images import list_images
from descmatch.match import DEFAULT_RATIO, match, match_descriptors
from descmatch.pairs import exhaustive, pairs_from_spec, read_pairs, sequential


def reference(
    a: np.ndarray, b: np.ndarray, ratio: float | None, mutual: bool, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Brute force in float64: matches, scores, and a mask of rows whose outcome is decided
    by a margin far above float32 rounding (the rows a float32 matcher must get right);
    ``scale``: the descriptors' typical norm, which the margins scale with."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.concatenate(
        [
            ((a64[s : s + 64, None, :] - b64[None, :, :]) ** 2).sum(-1)
            for s in range(0, len(a64), 64)
        ]
        or [np.zeros((0, len(b64)))]
    )
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
    eps = 1e-4 * scale  # on distances; eps2 on squared distances
    eps2 = 1e-4 * scale**2
    if ratio is not None:
        ok &= np.sqrt(d1) < ratio * np.sqrt(d2)
        with np.errstate(invalid="ignore"):
            margin = np.abs(np.sqrt(d1) - ratio * np.sqrt(d2))
        clear &= ~(np.isfinite(d2) & (margin < eps))
    if n1 > 1:
        clear &= ~(np.isfinite(d1) & (d2 - d1 < eps2))  # nearest must be unambiguous
    if mutual:
        col_best = np.argmin(d, axis=0)
        ok &= col_best[nn] == rows
        col_sorted = np.sort(d, axis=0)
        if n0 > 1:
            gap = col_sorted[1] - col_sorted[0]
            clear &= ~(np.isfinite(col_sorted[0][nn]) & (gap[nn] < eps2))
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


PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])
SIZES = [(1, 5, 8), (5, 1, 8), (2, 2, 4), (40, 30, 16), (120, 200, 128), (257, 101, 32)]


@pytest.mark.parametrize("n0,n1,dim", SIZES)
@pytest.mark.parametrize("ratio", [None, 0.8, DEFAULT_RATIO])
@pytest.mark.parametrize("mutual", [True, False])
@PRECISIONS
def test_matches_brute_force_reference(
    n0: int, n1: int, dim: int, ratio: float | None, mutual: bool, precision: str
) -> None:
    a, b = descriptors(n0, n1, dim, seed=n0 * 1000 + n1)
    ref_m, ref_s, clear = reference(a, b, ratio, mutual)
    assert clear.mean() > 0.9
    for max_elements in (1 << 26, 37, 1):  # one chunk, many chunks, one row per chunk
        m, s = run(a, b, ratio=ratio, mutual=mutual, max_elements=max_elements, precision=precision)
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
@PRECISIONS
def test_chunking_gives_identical_results(max_elements: int, precision: str) -> None:
    a, b = descriptors(300, 250, 64, seed=7)
    m_ref, s_ref = run(a, b, precision=precision)
    m, s = run(a, b, max_elements=max_elements, precision=precision)
    np.testing.assert_array_equal(m, m_ref)
    np.testing.assert_allclose(s, s_ref, rtol=0, atol=1e-6)  # BLAS rounding only


@PRECISIONS
def test_mutual_check_across_chunks(precision: str) -> None:
    """Row 0 and row 5 both have column 0 as nearest; the better one (row 5) is in a later
    chunk, so the column minimum must be carried across chunks."""
    b = np.eye(4, dtype=np.float32)
    a = np.full((6, 4), 0.0, np.float32)
    a[:, 3] = 1.0  # rows 1..4 are closest to column 3
    a[0] = [0.8, 0.6, 0.0, 0.0]
    a[5] = [0.99, 0.14, 0.0, 0.0]
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    for max_elements in (1 << 26, 4, 8):
        m, _ = run(a, b, ratio=None, mutual=True, max_elements=max_elements, precision=precision)
        assert m[0] == -1 and m[5] == 0, max_elements
        m, _ = run(a, b, ratio=None, mutual=False, max_elements=max_elements, precision=precision)
        assert m[0] == 0 and m[5] == 0


@PRECISIONS
def test_identical_descriptors_match_with_score_one(precision: str) -> None:
    a, _ = descriptors(50, 50, 32, seed=1)
    perm = np.random.default_rng(2).permutation(50)
    m, s = run(a, a[perm], precision=precision)
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(m, inverse)
    np.testing.assert_allclose(s, 1.0, atol=1e-5)


@PRECISIONS
def test_scores_are_cosine_similarity_for_unit_descriptors(precision: str) -> None:
    a, b = descriptors(80, 60, 16, seed=3)
    m, s = run(a, b, ratio=None, mutual=False, precision=precision)
    cos = (a * b[m]).sum(1)
    np.testing.assert_allclose(s, cos, atol=1e-5)


@pytest.mark.parametrize("n0,n1", [(0, 10), (10, 0), (0, 0)])
@PRECISIONS
def test_zero_keypoints_on_either_side(n0: int, n1: int, precision: str) -> None:
    a = np.zeros((n0, 128), np.float32)
    b = np.zeros((n1, 128), np.float32)
    m, s = run(a, b, precision=precision)
    assert m.shape == (n0,) and s.shape == (n0,)
    assert (m == -1).all() and (s == 0).all()


@PRECISIONS
def test_single_candidate_passes_ratio_but_not_mutual(precision: str) -> None:
    a, b = descriptors(6, 1, 16, seed=4)
    # No second neighbour: the ratio test passes.
    m, _ = run(a, b, ratio=0.5, mutual=False, precision=precision)
    assert (m == 0).all()
    m, _ = run(a, b, ratio=0.5, mutual=True, precision=precision)  # only the closest row keeps it
    d = ((a - b[0]) ** 2).sum(1)
    expected = np.full(6, -1)
    expected[np.argmin(d)] = 0
    np.testing.assert_array_equal(m, expected)


@PRECISIONS
def test_single_query_row(precision: str) -> None:
    a, b = descriptors(1, 20, 16, seed=5)
    b[7] = a[0] * 0.999 + 0.001
    b[7] /= np.linalg.norm(b[7])
    m, _ = run(a, b, precision=precision)
    assert m.tolist() == [7]


@PRECISIONS
def test_duplicate_candidates_fail_the_ratio_test(precision: str) -> None:
    a, b = descriptors(10, 12, 32, seed=6)
    b[3] = a[2]
    b[9] = a[2]  # two identical candidates for row 2
    m, _ = run(a, b, ratio=0.99, mutual=False, precision=precision)
    assert m[2] == -1
    m, _ = run(a, b, ratio=0.99, mutual=True, precision=precision)
    assert m[2] == -1
    m, _ = run(a, b, ratio=None, mutual=False, precision=precision)  # no ratio test: one
    assert m[2] in (3, 9)


@PRECISIONS
def test_nan_rows_never_match(precision: str) -> None:
    a, b = descriptors(30, 30, 16, seed=8)
    b_copy = a[np.random.default_rng(0).permutation(30)].copy()
    a[4] = np.nan
    a[11, 3] = np.nan
    b_copy[0] = np.nan
    for ratio, mutual in [(None, False), (None, True), (DEFAULT_RATIO, True)]:
        for max_elements in (1 << 26, 37):
            m, s = run(
                a,
                b_copy,
                ratio=ratio,
                mutual=mutual,
                max_elements=max_elements,
                precision=precision,
            )
            assert m[4] == -1 and m[11] == -1 and s[4] == 0 and s[11] == 0
            assert 0 not in m.tolist()  # the NaN column is nobody's match
            assert np.isfinite(s).all()
            assert (m >= 0).sum() >= 25


@PRECISIONS
def test_all_nan_gives_no_matches(precision: str) -> None:
    a = np.full((5, 8), np.nan, np.float32)
    b = np.ones((4, 8), np.float32)
    m, s = run(a, b, precision=precision)
    assert (m == -1).all() and (s == 0).all()


def test_different_descriptor_sizes_raise() -> None:
    with pytest.raises(ValueError, match="128.*64|64.*128"):
        match_descriptors(torch.zeros(3, 128), torch.zeros(4, 64))


@PRECISIONS
def test_half_precision_inputs(precision: str) -> None:
    a, b = descriptors(60, 50, 32, seed=9)
    m32, _ = run(a, b)
    m16, s16 = match_descriptors(
        torch.from_numpy(a).half(), torch.from_numpy(b).half(), precision=precision
    )
    assert s16.dtype == torch.float32
    assert (m16.numpy() == m32).mean() > 0.95


# -- reduced precision: the same decisions as float32 ----------------------------------------
@pytest.fixture(params=[1, 2], ids=["inline", "workers"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Torch threads: with 1 the reduced-precision path runs on the calling thread, with 2
    on the CPU workers."""
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _unit_at(rng: np.random.Generator, centre: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """Unit vectors at squared distance d2 from the unit rows of centre."""
    u = rng.normal(size=centre.shape)
    u -= (u * centre).sum(1, keepdims=True) * centre
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v = centre + np.sqrt(1.0 / (1.0 - d2 / 2.0) ** 2 - 1.0)[:, None] * u
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _mirror(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """The rows of x reflected in random hyperplanes through 0 (same norms)."""
    v = _unit_rows(rng, *x.shape)
    return x - 2 * (x * v).sum(1, keepdims=True) * v


NEAR_TIES = [("unit", 1.0), ("free", 1.0), ("large", 450.0)]  # kind, typical norm


def near_ties(
    kind: str, seed: int, n: int = 240, extra: int = 17, dim: int = 64, ratio: float = DEFAULT_RATIO
) -> tuple[np.ndarray, np.ndarray]:
    """n rows, n + extra columns whose decisions hinge on squared distances 0.1-0.5 % apart:
    far above float32 rounding, far below bf16's. With m = n // 6: rows 0..m-1 have two
    nearly equidistant nearest columns; rows m..2m-1 their second nearest column at the
    ratio threshold; rows 2m+i and 3m+i are nearly equidistant from column 4m+i (the
    mutual check). ``kind``: "unit" descriptors; "free": norms 0.2..5; "large": norms
    300..600, non-negative before the near ties are built (raw SIFT's scale)."""
    rng = np.random.default_rng(seed)
    m = n // 6
    i = np.arange(m)

    def gap() -> np.ndarray:  # relative, either sign
        return rng.choice([-1.0, 1.0], m) * rng.uniform(1e-3, 5e-3, m)

    if kind == "unit":
        a, b = _unit_rows(rng, n, dim), _unit_rows(rng, n + extra, dim)
        x = rng.uniform(0.2, 0.8, m)
        b[i], b[m + i] = _unit_at(rng, a[i], x), _unit_at(rng, a[i], x * (1 + gap()))
        x = rng.uniform(0.1, 0.45, m)
        b[2 * m + i] = _unit_at(rng, a[m + i], x)
        b[3 * m + i] = _unit_at(rng, a[m + i], x / ratio**2 * (1 + gap()))
        x = rng.uniform(0.1, 0.5, m)
        a[2 * m + i] = _unit_at(rng, b[4 * m + i], x)
        a[3 * m + i] = _unit_at(rng, b[4 * m + i], x * (1 + gap()))
        return a.astype(np.float32), b.astype(np.float32)
    if kind == "free":
        a = rng.normal(size=(n, dim)) * rng.uniform(0.2, 5.0, (n, 1))
        b = rng.normal(size=(n + extra, dim)) * rng.uniform(0.2, 5.0, (n + extra, 1))
    else:
        a = np.abs(_unit_rows(rng, n, dim)) * rng.uniform(300, 600, (n, 1))
        b = np.abs(_unit_rows(rng, n + extra, dim)) * rng.uniform(300, 600, (n + extra, 1))

    def offset(c: np.ndarray) -> np.ndarray:  # 0.3 |c| in a random direction
        return 0.3 * np.linalg.norm(c, axis=1, keepdims=True) * _unit_rows(rng, *c.shape)

    # |c + mirror(o) (1 + g/2)|^2 from c: |o|^2 (1 + g/2)^2, g relative apart from |o|^2.
    o = offset(a[i])
    b[i], b[m + i] = a[i] + o, a[i] + _mirror(rng, o) * (1 + gap()[:, None] / 2)
    o = offset(a[m + i])
    b[2 * m + i] = a[m + i] + o
    b[3 * m + i] = a[m + i] + _mirror(rng, o) / ratio * (1 + gap()[:, None] / 2)
    o = offset(b[4 * m + i])
    a[2 * m + i] = b[4 * m + i] + o
    a[3 * m + i] = b[4 * m + i] + _mirror(rng, o) * (1 + gap()[:, None] / 2)
    return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("kind,scale", NEAR_TIES)
@pytest.mark.parametrize(
    "ratio,mutual", [(DEFAULT_RATIO, True), (DEFAULT_RATIO, False), (None, True), (None, False)]
)
def test_reduced_precision_decides_near_ties_as_float64(
    kind: str, scale: float, ratio: float | None, mutual: bool, threads: int
) -> None:
    a, b = near_ties(kind, seed=len(kind))
    ref_m, ref_s, clear = reference(a, b, ratio, mutual, scale)
    assert clear.mean() > 0.8
    m32, _ = run(a, b, ratio=ratio, mutual=mutual, precision="fp32")
    np.testing.assert_array_equal(m32[clear], ref_m[clear])
    for max_elements in (1 << 26, 999, 1):
        m, s = run(a, b, ratio=ratio, mutual=mutual, max_elements=max_elements, precision="bf16")
        np.testing.assert_array_equal(m[clear], ref_m[clear])
        assert (m == m32).mean() > 0.99  # elsewhere float32 rounding decides
        np.testing.assert_allclose(s[clear], np.clip(ref_s[clear], -1, 1), atol=1e-5)
        assert np.all(s[m < 0] == 0)


def naive_bf16(a: np.ndarray, b: np.ndarray, ratio: float | None, mutual: bool) -> np.ndarray:
    """The shortcut: squared distances from one bf16 product, decided as they come."""
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    d = (
        (ta * ta).sum(1)[:, None]
        + (tb * tb).sum(1)[None, :]
        - 2 * (ta.bfloat16() @ tb.bfloat16().t()).float()
    ).numpy()
    order = np.argsort(d, axis=1, kind="stable")
    rows = np.arange(len(a))
    nn = order[:, 0]
    ok = np.ones(len(a), bool)
    if ratio is not None:
        ok &= d[rows, nn] < ratio**2 * d[rows, order[:, 1]]
    if mutual:
        ok &= d.argmin(0)[nn] == rows
    return np.where(ok, nn, -1)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 1.0, 1.5])
def test_reduced_precision_with_any_ratio(ratio: float) -> None:
    a, b = near_ties("free", seed=9)
    ref_m, _, clear = reference(a, b, ratio, True)
    m, _ = run(a, b, ratio=ratio, precision="bf16")
    np.testing.assert_array_equal(m[clear], ref_m[clear])
    assert (m == run(a, b, ratio=ratio, precision="fp32")[0]).mean() > 0.99


@pytest.mark.parametrize("kind,scale", NEAR_TIES)
def test_near_ties_are_beyond_bf16(kind: str, scale: float) -> None:
    """The cases above are real tests: decided from a bf16 product as it comes, many of
    their clear rows go wrong."""
    a, b = near_ties(kind, seed=len(kind))
    for ratio, mutual, wrong in [(DEFAULT_RATIO, True, 30), (None, False, 10)]:
        ref_m, _, clear = reference(a, b, ratio, mutual, scale)
        m = naive_bf16(a, b, ratio, mutual)
        assert (m[clear] != ref_m[clear]).sum() >= wrong


def test_reduced_precision_falls_back_to_float32_only_where_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Near ties send rows and columns to float32; well separated descriptors none."""
    calls: list[tuple[int, int]] = []
    sq_dist = match_module._sq_dist

    def spy(x: torch.Tensor, nx: torch.Tensor, yt: torch.Tensor, ny: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], yt.shape[1]))
        return sq_dist(x, nx, yt, ny)

    monkeypatch.setattr(match_module, "_sq_dist", spy)
    a, b = near_ties("unit", seed=4)
    n0, n1 = len(a), len(b)
    m, _ = run(a, b, precision="bf16")
    rows = sum(r for r, c in calls if c == n1)  # rows against all of b
    cols = sum(r for r, c in calls if c == n0)  # columns against all of a
    assert 0 < rows < n0 // 2 and 0 < cols < n1 // 4
    ref_m, _, clear = reference(a, b, DEFAULT_RATIO, True)
    np.testing.assert_array_equal(m[clear], ref_m[clear])
    calls.clear()
    rng = np.random.default_rng(5)
    a = _unit_rows(rng, 400, 128)
    b = np.concatenate([a[:200] + 0.05 * rng.normal(size=(200, 128)), _unit_rows(rng, 200, 128)])
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    m, _ = run(a.astype(np.float32), b.astype(np.float32), precision="bf16")
    assert calls == []
    assert (m[:200] == np.arange(200)).all() and (m[200:] == -1).all()


@pytest.mark.parametrize("dim", [2, 16, 128, 300])
@pytest.mark.parametrize("kind", ["unit", "norms", "large", "tiny", "signs"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_product_error_bound(kind: str, dim: int, dtype: torch.dtype) -> None:
    """Every entry of the reduced product lies within the bound the decisions rely on, and
    the bound is tight enough to decide most rows (unit descriptors: within 1 % of 2).
    bf16: the CPU's product, rounded to bf16; fp16: CUDA's (float32 out) done here in
    float32 on the fp16 operands."""
    rng = np.random.default_rng(dim)
    x = rng.normal(size=(300, dim))
    if kind == "unit":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    elif kind == "norms":
        x *= 10.0 ** rng.uniform(-3, 3, (300, 1))
    elif kind == "large":
        x = np.abs(x) * 1e4
    elif kind == "tiny":
        x *= 1e-25
    else:  # mostly near-duplicates of a few, mixed signs and scales
        x = x[rng.integers(0, 5, 300)] * rng.choice([-1, 1, 3], (300, 1))
        x += 1e-3 * rng.normal(size=x.shape)
    x = x.astype(np.float32)
    a, b = torch.from_numpy(x[:140]), torch.from_numpy(x[140:])
    na, nb = (a * a).sum(1), (b * b).sum(1)
    A, Aq, sa = match_module._augment(a, na, dtype, lhs=True)
    B, Bq, sb = match_module._augment(b, nb, dtype, lhs=False)
    q_row, q_col = match_module._error_bounds(A, Aq, na, sa, B, Bq, nb, sb, dim)
    if dtype == torch.bfloat16:
        S, u = (Aq @ Bq.t()).double(), match_module._OUT_ROUNDING
    else:
        S, u = (Aq.float() @ Bq.float().t()).double(), 0.0
    a64, b64 = a.double(), b.double()
    exact = -0.5 * sa * sb * ((a64[:, None] - b64[None]) ** 2).sum(-1)
    err = (S - exact).abs()
    assert (err <= u * S.abs() + q_row[:, None].double()).all()
    assert (err <= u * S.abs() + q_col[None, :].double()).all()
    if kind == "unit":
        assert q_row.max() < 0.01 and q_col.max() < 0.01


@PRECISIONS
def test_column_nearest_accounts_for_norms(precision: str) -> None:
    """For non-unit descriptors the nearest is not the largest dot product: column 0's
    nearest row is the shorter one on its ray, row 2's nearest column the shorter one."""
    e = np.eye(4, dtype=np.float32)
    b = np.stack([e[0], e[1], 1.25 * e[2], 0.8 * e[2]])
    a = np.stack([1.25 * e[0], 0.8 * e[0], e[2]])
    for ratio in (None, DEFAULT_RATIO):
        m, s = run(a, b, ratio=ratio, mutual=True, precision=precision)
        assert m.tolist() == [-1, 0, 3]
        np.testing.assert_allclose(s[1:], [1 - 0.04 / 2, 1 - 0.04 / 2], atol=1e-6)
        m, _ = run(a, b, ratio=ratio, mutual=False, precision=precision)
        assert m.tolist() == [0, 0, 3]


def test_reduced_precision_on_rootsift(example_features: Path) -> None:
    """Real descriptors (RootSIFT of the example views): bf16 gives the float32 matches."""
    d0 = np.ascontiguousarray(read_features(example_features, "view1.jpg")["descriptors"].T)
    d0 = d0[:600]
    d1 = np.ascontiguousarray(read_features(example_features, "view2.jpg")["descriptors"].T)
    ref_m, _, clear = reference(d0, d1, DEFAULT_RATIO, True)
    assert clear.mean() > 0.95
    m, s = run(d0, d1, precision="bf16")
    m32, s32 = run(d0, d1, precision="fp32")
    np.testing.assert_array_equal(m[clear], ref_m[clear])
    assert (m == m32).mean() > 0.99
    np.testing.assert_allclose(s[m == m32], s32[m == m32], atol=1e-5)
    assert (m >= 0).sum() > 100


def test_cpu_workers_keep_the_callers_thread_setting() -> None:
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a, b = near_ties("free", seed=6)
        m2, s2 = run(a, b, precision="bf16")
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        m1, s1 = run(a, b, precision="bf16")
        assert torch.get_num_threads() == 1
        np.testing.assert_array_equal(m1, m2)
        np.testing.assert_array_equal(s1, s2)
    finally:
        torch.set_num_threads(n)


def test_precision_argument() -> None:
    a, b = near_ties("unit", seed=7)
    m_auto, s_auto = run(a, b)  # auto: fp32 below 2^18 entries
    m32, s32 = run(a, b, precision="fp32")
    np.testing.assert_array_equal(m_auto, m32)
    np.testing.assert_array_equal(s_auto, s32)
    with pytest.raises(ValueError, match="precision"):
        run(a, b, precision="fp64")
    with pytest.raises(ValueError, match="CUDA"):
        run(a, b, precision="fp16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["auto", "fp16", "bf16"])
@pytest.mark.parametrize("kind,scale", NEAR_TIES)
def test_reduced_precision_on_cuda(precision: str, kind: str, scale: float) -> None:
    a, b = near_ties(kind, seed=8, n=600)  # 600 x 617: auto is fp16
    ref_m, ref_s, clear = reference(a, b, DEFAULT_RATIO, True, scale)
    assert clear.mean() > 0.8
    for max_elements in (1 << 26, 9999):
        m, s = match_descriptors(
            torch.from_numpy(a).cuda(),
            torch.from_numpy(b).cuda(),
            max_elements=max_elements,
            precision=precision,
        )
        m, s = m.cpu().numpy(), s.cpu().numpy()
        np.testing.assert_array_equal(m[clear], ref_m[clear])
        np.testing.assert_allclose(s[clear], np.clip(ref_s[clear], -1, 1), atol=1e-5)


# -- the match stage -------------------------------------------------------------------------
def test_match_stage_writes_what_the_matcher_finds(example_features: Path, tmp_path: Path) -> None:
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


def test_match_stage_resumes_and_checks_settings(example_features: Path, tmp_path: Path) -> None:
    names = ["view1.jpg", "view2.jpg", "view3.jpg"]
    out = tmp_path / "m.h5"
    first = match(example_features, sequential(names, 1), out)
    assert first.matched == 2
    before = out.read_bytes()
    again = match(example_features, sequential(names, 1), out)
    assert again.matched == 0 and again.skipped == 2
    assert out.read_bytes() == before
    # Reversed pairs count as done; the missing pair is added.
    more = match(example_features, [("view2.jpg", "view1.jpg"), ("view1.jpg", "view3.jpg")], out)
    assert more.skipped == 1 and more.matched == 1
    with Reader(out, "matches") as r:
        assert len(r.keys) == 3
    with pytest.raises(SchemaError, match="settings"):
        match(example_features, exhaustive(names), out, ratio=0.5)
    assert len(Reader(out, "matches").keys) == 3


def test_match_stage_rejects_unknown_images(example_features: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.jpg"):
        match(example_features, [("view1.jpg", "nope.jpg")], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()


def test_match_stage_with_nested_image_names(tmp_path: Path) -> None:
    write_scenes(tmp_path / "imgs" / "a", 1, first_seed=3)
    write_scenes(tmp_path / "imgs" / "b", 1, first_seed=3)  # the same scene
    feats = tmp_path / "f.h5"
    extract(
        list_images(tmp_path / "imgs"),
        feats,
        build_describer("rootsift"),
        SiftDetector(max_keypoints=100),
    )
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
    assert pairs_from_spec("sequential:2", names) == [
        ("a", "b"),
        ("a", "c"),
        ("b", "c"),
        ("b", "d"),
        ("c", "d"),
    ]
    assert pairs_from_spec("sequential", names) == exhaustive(names)  # default window 5
    for bad in ("sequential:0", "sequential:x", "no-such-pairs-file.txt"):
        with pytest.raises(InputError, match=bad.split(":")[0]):
            pairs_from_spec(bad, names)
