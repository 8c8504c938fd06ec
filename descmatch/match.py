"""Mutual nearest neighbour + Lowe's ratio test as chunked matrix products on the device,
and the match stage (features.h5 + pairs -> matches.h5)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from .distributed import session
from .errors import InputError
from .h5 import Reader, Shard, Writer, settings_json
from .outputs import check_writable, refuse_inputs
from .pairkeys import plan_keys
from .pairs import write_pairs

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.85
MAX_ELEMENTS = 1 << 26  # distance-matrix entries per chunk: 256 MB in float32
MATCH_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_REDUCED_MIN_ELEMENTS = 1 << 18  # auto: smaller matrices run the fp32 path (as fast there)
_CPU_CHUNK_ELEMENTS = 1 << 21  # reduced-precision CPU chunk: 4 MB in bf16, stays in cache
_SAFETY = 1.25  # factor on the rounding-error bound of the reduced-precision similarities
_EPS32 = 2.0**-24  # float32 unit roundoff


@torch.inference_mode()
def match_descriptors(
    desc0: torch.Tensor,
    desc1: torch.Tensor,
    ratio: float | None = DEFAULT_RATIO,
    mutual: bool = True,
    max_elements: int = MAX_ELEMENTS,
    precision: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match rows of desc0 to rows of desc1 by L2 distance.

    A row i matches its nearest neighbour j when (ratio) d(i,j) < ratio * d(i, second
    nearest) and (mutual) i is also j's nearest neighbour. The distance matrix is computed
    in row chunks of at most ``max_elements`` entries, so memory stays bounded; column
    minima are tracked across chunks. NaN descriptors never match; with a single candidate
    the ratio test passes. Ties (identical candidates) fail the ratio test.

    ``precision``: ``fp32`` computes every distance in float32 (the reference). ``bf16``
    (CPUs with native bf16, CUDA) and ``fp16`` (CUDA) compute the similarity matrix in that
    precision and settle each decision (nearest, ratio test, mutual check) against a
    rigorous bound on its rounding error; a decision the bound cannot settle is re-made in
    float32 for that row or column, so the matches are the float32 ones. Where CUDA cannot
    give a float32-accumulated product (old torch) they run fp32. ``auto``: bf16 on CPUs
    with native bf16, fp16 on CUDA, else fp32; fp32 for small matrices. On the CPU the
    reduced-precision chunks are shared out to ``torch.get_num_threads()`` single-threaded
    workers, which keeps its speed on a machine busy with other work.

    Shape: desc0 (N0,D), desc1 (N1,D) -> matches0 (N0,) int64 (-1 = none), scores0 (N0,)
    float32 (1 - d^2/2: the cosine similarity for unit descriptors; 0 where unmatched).
    """
    if precision not in MATCH_PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(MATCH_PRECISIONS)}")
    n0, n1 = desc0.shape[0], desc1.shape[0]
    device = desc0.device
    matches = torch.full((n0,), -1, dtype=torch.long, device=device)
    scores = torch.zeros((n0,), dtype=torch.float32, device=device)
    if n0 == 0 or n1 == 0:
        return matches, scores
    if desc0.shape[1] != desc1.shape[1]:
        raise ValueError(f"descriptor sizes differ: {desc0.shape[1]} vs {desc1.shape[1]}")
    a = desc0.float()
    b = desc1.float().to(device)
    dtype = _reduced_dtype(precision, device, n0 * n1)
    workers = _cpu_workers() if dtype is not None and device.type == "cpu" else None
    if workers is None:
        best, keep, d1, rows0, rows1 = _match(a, b, ratio, mutual, max_elements, dtype, None)
    else:  # everything on the workers: no multi-threaded torch op on the calling thread
        best, keep, d1, rows0, rows1 = workers.submit(
            _match, a, b, ratio, mutual, max_elements, dtype, workers
        ).result()
    i0 = keep.nonzero().squeeze(1)
    j1 = best[i0]
    s = (1.0 - 0.5 * d1[i0]).clamp(-1.0, 1.0)
    if rows0 is not None:
        i0 = rows0[i0]
    if rows1 is not None:
        j1 = rows1[j1]
    matches[i0] = j1
    scores[i0] = s
    return matches, scores


@torch.inference_mode()
def _match(
    a: torch.Tensor,
    b: torch.Tensor,
    ratio: float | None,
    mutual: bool,
    max_elements: int,
    dtype: torch.dtype | None,
    workers: _Workers | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(best, matched, d1) per finite row of a, and the indices of the finite rows of a and
    of b (None: all)."""
    na, nb = (a * a).sum(1), (b * b).sum(1)
    # A descriptor with a non-finite squared norm (NaN, inf, overflow) is at no finite
    # distance from anything: it never matches and is nobody's neighbour. Leave it out.
    rows0, rows1 = _finite_rows(na), _finite_rows(nb)
    if rows0 is not None:
        a, na = a[rows0], na[rows0]
    if rows1 is not None:
        b, nb = b[rows1], nb[rows1]
    if a.shape[0] == 0 or b.shape[0] == 0:
        none = torch.zeros((a.shape[0],), dtype=torch.bool, device=a.device)
        return none.long(), none, none.float(), rows0, rows1
    if dtype is None:
        return (*_match_fp32(a, na, b, nb, ratio, mutual, max_elements), rows0, rows1)
    return (
        *_match_reduced(a, na, b, nb, ratio, mutual, max_elements, dtype, workers),
        rows0,
        rows1,
    )


def _finite_rows(x: torch.Tensor) -> torch.Tensor | None:
    """Indices of the finite entries of x, None when all are."""
    ok = torch.isfinite(x)
    return None if bool(ok.all()) else ok.nonzero().squeeze(1)


_FP32_OUT: dict[tuple[str, torch.dtype], bool] = {}


def _reduced_dtype(precision: str, device: torch.device, elements: int) -> torch.dtype | None:
    """The dtype of the similarity matrix, None for the fp32 path."""
    from .describe import resolve_precision

    if precision == "fp32" or (precision == "auto" and elements < _REDUCED_MIN_ELEMENTS):
        return None
    if precision == "auto":
        precision = resolve_precision("auto", device)  # fp16 on CUDA, bf16 on CPUs that have it
    elif precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device; use bf16 on the CPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None or (device.type == "cuda" and not _mm_fp32_out(device, dtype)):
        return None
    return dtype


def _mm_fp32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm takes ``out_dtype=float32`` for dtype inputs on this device (CUDA:
    float32 accumulation, whatever the reduced-precision-reduction flags say)."""
    key = (device.type, dtype)
    if key not in _FP32_OUT:
        try:
            x = torch.ones(2, 2, dtype=dtype, device=device)
            _FP32_OUT[key] = torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _FP32_OUT[key] = False
    return _FP32_OUT[key]


# -- CPU workers ----------------------------------------------------------------------------
T = TypeVar("T")


class _Workers:
    """``n`` threads whose torch ops run single-threaded (their own OpenMP setting), taking
    chunks one at a time: where the OS holds one back (a busy machine) the others take its
    share, instead of every multi-threaded op waiting for its slowest thread."""

    def __init__(self, n: int) -> None:
        self.n, self.pid = n, os.getpid()
        self.pool = ThreadPoolExecutor(n, "descmatch-match", initializer=_one_thread)
        started = threading.Barrier(n)
        for f in [self.pool.submit(started.wait) for _ in range(n)]:
            f.result()
        torch.set_num_threads(n)  # set_num_threads(1) in the workers also set the default

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        return self.pool.submit(fn, *args)

    def map(self, fn: Callable[[int], T], starts: range) -> list[T]:
        """[fn(s) for s in starts], on the calling thread (a worker) and the idle others."""
        it, lock, out, stop = iter(starts), threading.Lock(), {}, threading.Event()

        @torch.inference_mode()
        def loop() -> None:
            while True:
                with lock:
                    s = None if stop.is_set() else next(it, None)
                if s is None:
                    return
                try:
                    out[s] = fn(s)
                except BaseException:
                    stop.set()
                    raise

        helpers = [self.pool.submit(loop) for _ in range(self.n - 1)]
        try:
            loop()
        finally:
            stop.set()
            for f in helpers:  # one that never started (all threads busy) is not waited for
                if not f.cancel():
                    f.exception()
        for f in helpers:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [out[s] for s in starts]


_WORKERS: _Workers | None = None
_WORKERS_LOCK = threading.Lock()
_OPENMP: bool | None = None


def _one_thread() -> None:
    torch.get_num_threads()  # torch's per-thread set-up first, or it would undo the next line
    torch.set_num_threads(1)


def _cpu_workers() -> _Workers | None:
    """The workers for torch.get_num_threads() threads (None for one thread, or where torch's
    thread setting is not per thread: a parallel backend other than OpenMP)."""
    global _WORKERS, _OPENMP
    n = torch.get_num_threads()
    if _OPENMP is None:
        _OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    if n <= 1 or not _OPENMP:
        return None
    with _WORKERS_LOCK:
        if _WORKERS is None or _WORKERS.n != n or _WORKERS.pid != os.getpid():
            if _WORKERS is not None and _WORKERS.pid == os.getpid():
                _WORKERS.pool.shutdown(wait=False)
            _WORKERS = _Workers(n)
        return _WORKERS


def _chunks(n: int, size: int, workers: _Workers | None, fn: Callable[[int], T]) -> list[T]:
    """[fn(s) for s in range(0, n, size)], on the workers when there are."""
    starts = range(0, n, max(1, size))
    return workers.map(fn, starts) if workers is not None else [fn(s) for s in starts]


# -- float32 ---------------------------------------------------------------------------------
def _sq_dist(a: torch.Tensor, na: torch.Tensor, bt: torch.Tensor, nb: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances in float32 between the rows of a and the columns of bt."""
    return torch.addmm(na[:, None] + nb[None, :], a, bt, alpha=-2.0).clamp_min_(0)


def _top2(dist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: index of the smallest entry, the smallest and the second smallest (inf
    when the row has one entry)."""
    if dist.shape[1] >= 2:
        vals, idx = torch.topk(dist, 2, dim=1, largest=False)
        return idx[:, 0], vals[:, 0], vals[:, 1]
    return (
        torch.zeros(dist.shape[0], dtype=torch.long, device=dist.device),
        dist[:, 0],
        torch.full_like(dist[:, 0], float("inf")),
    )


def _ratio_ok(d1: torch.Tensor, d2: torch.Tensor, ratio: float | None) -> torch.Tensor:
    ok = torch.isfinite(d1)
    if ratio is not None:
        ok &= d1 < (ratio * ratio) * d2
    return ok


def _match_fp32(
    a: torch.Tensor,
    na: torch.Tensor,
    b: torch.Tensor,
    nb: torch.Tensor,
    ratio: float | None,
    mutual: bool,
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 reference on finite descriptors (na, nb: squared norms): (best,
    matched, d1) per row of a."""
    n0, n1 = a.shape[0], b.shape[0]
    device = a.device
    best = torch.empty((n0,), dtype=torch.long, device=device)
    d1 = torch.empty((n0,), device=device)
    d2 = torch.empty((n0,), device=device)
    col_min = torch.full((n1,), float("inf"), device=device)
    col_arg = torch.full((n1,), -1, dtype=torch.long, device=device)
    bt = b.t().contiguous()
    chunk = max(1, max_elements // n1)
    for s in range(0, n0, chunk):
        e = min(n0, s + chunk)
        dist = _sq_dist(a[s:e], na[s:e], bt, nb)
        best[s:e], d1[s:e], d2[s:e] = _top2(dist)
        if mutual:
            cmin, carg = dist.min(dim=0)
            better = cmin < col_min
            col_min = torch.where(better, cmin, col_min)
            col_arg = torch.where(better, carg + s, col_arg)
    keep = _ratio_ok(d1, d2, ratio)
    if mutual:
        keep &= col_arg[best] == torch.arange(n0, device=device)
    return best, keep, d1


# -- reduced precision -----------------------------------------------------------------------
def _pow2_scale(m: float) -> float:
    """A power of two that brings m into [0.5, 1) (1 for 0 or non-finite)."""
    return 2.0 ** -math.frexp(m)[1] if 0 < m < float("inf") else 1.0


def _augment(
    x: torch.Tensor, nx: torch.Tensor, dtype: torch.dtype, lhs: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(X, X in dtype, scale): A = [a, h, l, 1, 1] (lhs) and B = [b, 1, 1, h, l] with h + l =
    -|x|^2/2 (h in dtype, l the remainder), so that A.B = -d^2/2; times a power of two
    keeping fp16 in range."""
    n, dim = x.shape
    X = torch.zeros((n, dim + 4), device=x.device)
    X[:, :dim] = x
    h = dim if lhs else dim + 2
    X[:, h] = -0.5 * nx
    X[:, dim + 2 if lhs else dim] = 1.0
    X[:, dim + 3 if lhs else dim + 1] = 1.0
    s = 1.0
    if dtype == torch.float16:  # bf16 has float32's range
        s = _pow2_scale(float(X.abs().max()))
        X *= s
    hi = X[:, h].to(dtype).float()
    X[:, h + 1] = X[:, h] - hi  # exact
    X[:, h] = hi
    Xq = X.to(dtype)
    # Subnormals to 0 here, not in the matrix product (DAZ): then X - Xq is the whole error.
    Xq.masked_fill_(Xq.abs() < torch.finfo(dtype).tiny, 0)
    return X, Xq, s


_OUT_ROUNDING = _SAFETY * 1.01 * 2.0**-7  # of a float32 sum rounded to bf16 (RNE or not)


def _error_bounds(
    A: torch.Tensor,
    Aq: torch.Tensor,
    na: torch.Tensor,
    sa: float,
    B: torch.Tensor,
    Bq: torch.Tensor,
    nb: torch.Tensor,
    sb: float,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q_row[i], q_col[j]: bounds on |A.B - (Aq.Bq summed in float32)| over row i, column j,
    the exact -d^2/2 (times sa sb) standing for A.B. |A.B - Aq.Bq| <= sum_k |eA_k||B_k| +
    |Aq_k||eB_k| (e: X - Xq): Cauchy-Schwarz over the descriptor part, term by term over
    the 4 extra columns; float32 accumulation: k roundings of sum_k |Aq_k||Bq_k|; float32
    rounding of the squared norms and of the decisions' arithmetic (slack)."""

    def parts(
        X: torch.Tensor, Xq: torch.Tensor, nx: torch.Tensor, s: float
    ) -> tuple[torch.Tensor, ...]:
        E = X - Xq
        ed = E[:, :dim].norm(dim=1)
        xd = nx.sqrt() * s  # |x|
        return xd, xd + ed, ed, X[:, dim:].abs(), Xq[:, dim:].float().abs(), E[:, dim:].abs()

    _, aqd, ead, _, aqa, eaa = parts(A, Aq, na, sa)  # (|a|), >= |aq|, |ea|, extra columns
    bd, bqd, ebd, ba, bqa, eba = parts(B, Bq, nb, sb)
    acc = 1.01 * (dim + 4) * _EPS32
    slack = 4 * dim * _EPS32 * sa * sb
    q_row = (
        ead * bd.max()
        + eaa @ ba.amax(0)
        + aqd * ebd.max()
        + aqa @ eba.amax(0)
        + acc * (aqd * bqd.max() + aqa @ bqa.amax(0))
        + slack * (na + nb.max())
    )
    q_col = (
        ead.max() * bd
        + ba @ eaa.amax(0)
        + aqd.max() * ebd
        + eba @ aqa.amax(0)
        + acc * (aqd.max() * bqd + bqa @ aqa.amax(0))
        + slack * (na.max() + nb)
    )
    return _SAFETY * q_row + 2.0**-100, _SAFETY * q_col + 2.0**-100


def _match_reduced(
    a: torch.Tensor,
    na: torch.Tensor,
    b: torch.Tensor,
    nb: torch.Tensor,
    ratio: float | None,
    mutual: bool,
    max_elements: int,
    dtype: torch.dtype,
    workers: _Workers | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fp32 answer from a reduced-precision similarity matrix (see match_descriptors).

    S = A.B = -d^2/2 (see _augment) is computed in ``dtype`` (float32 accumulation; on the
    CPU the result is rounded to bf16). Its error is at most u|S~| + q, q from the rounding
    of A and B and the accumulation: q_row[i] over row i, q_col[j] over column j. Per row:
    the best m1 (at j1) and second best m2 (the row with j1 masked) of S~, and the exact
    d^2 at j1; per column: the best X over the rows whose own best is elsewhere. A decision
    the bounds leave open is re-made in float32: the whole row, or the whole column."""
    n0, n1, dim = a.shape[0], b.shape[0], a.shape[1]
    device = a.device
    inf, fmin = float("inf"), torch.finfo(torch.float32).min
    A, Aq, sa = _augment(a, na, dtype, lhs=True)
    B, Bq, sb = _augment(b, nb, dtype, lhs=False)
    ss = sa * sb  # S = ss * T, T = -d^2/2
    q_row, q_col = _error_bounds(A, Aq, na, sa, B, Bq, nb, sb, dim)
    u = 0.0 if device.type == "cuda" else _OUT_ROUNDING

    def up(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # true S <= up(S~), monotone
        return x + u * x.abs() + q

    def low(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # true S >= low(S~)
        return x - u * x.abs() - q

    # One pass over S~ in row chunks.
    sdtype = torch.float32 if device.type == "cuda" else dtype
    m1 = torch.empty((n0,), dtype=sdtype, device=device)
    m2 = torch.empty((n0,), dtype=sdtype, device=device)
    j1 = torch.empty((n0,), dtype=torch.long, device=device)
    dex = torch.empty((n0,), device=device)  # exact d^2 at j1
    X = torch.full((n1,), -inf, dtype=sdtype, device=device)  # column best, j1 masked
    X_lock = threading.Lock()
    bqt = Bq.t()
    size = max_elements if device.type == "cuda" else min(max_elements, _CPU_CHUNK_ELEMENTS)
    chunk = max(1, size // n1)

    def rows_chunk(s: int) -> None:
        e = min(n0, s + chunk)
        if device.type == "cuda":
            S = torch.mm(Aq[s:e], bqt, out_dtype=torch.float32)
        else:
            S = torch.mm(Aq[s:e], bqt)
        v, j = S.max(dim=1)
        m1[s:e], j1[s:e] = v, j
        dex[s:e] = (a[s:e] - b[j]).square().sum(1)
        S.view(-1).index_fill_(0, j + torch.arange(0, S.numel(), n1, device=device), -inf)
        m2[s:e] = S.amax(dim=1)
        if mutual:
            col = S.amax(dim=0)
            with X_lock:
                torch.maximum(X, col, out=X)

    _chunks(n0, chunk, workers, rows_chunk)

    # Rows. d^2 = -2 S / ss; dex is float32 on the exact difference (relative error rho).
    rho = 4 * (dim + 2) * _EPS32
    m1f, m2f = m1.float(), m2.float().clamp_min(fmin)  # m2 = -inf: a single candidate
    valid = torch.isfinite(m1f) & (m2f < inf) & torch.isfinite(dex)
    unique_best = low(m1f, q_row) > up(m2f, q_row)  # j1 is the nearest, surely
    if ratio is None:
        passed, failed = unique_best, torch.zeros_like(valid)
    else:
        r2 = ratio * ratio
        d1lo = (-2 / ss * up(m1f, q_row)).clamp_min(0)
        d2lo = (-2 / ss * up(m2f, q_row)).clamp_min(0)
        d2hi = -2 / ss * low(m2f, q_row)
        passed = dex * (1 + rho) < r2 * d2lo  # and (ratio <= 1) j1 the nearest
        if r2 > 1:
            passed &= unique_best
        failed = torch.where(unique_best, dex * (1 - rho), d1lo) >= r2 * d2hi
    keep = valid & passed & ~failed
    sure = valid & (passed | failed)
    best = j1
    need_col = torch.zeros_like(keep)
    if mutual:
        # Column j = j1[i]: the rows whose best is j hold their m1 there (the largest:
        # top[j], the next: second[j]), every other row at most X[j]. Row i's own value
        # there is exact: -dex/2.
        Xf = X.float()
        neg = torch.full((n1,), -inf, device=device)
        top = neg.scatter_reduce(0, j1, m1f, "amax")
        is_top = m1f == top[j1]
        second = neg.scatter_reduce(0, j1, m1f.masked_fill(is_top, -inf), "amax")
        second = torch.where(torch.bincount(j1[is_top], minlength=n1) > 1, top, second)
        others = torch.maximum(Xf[j1], torch.where(is_top, second[j1], top[j1]))
        others = others.clamp_min(fmin)
        own = -0.5 * ss * dex
        tol = 0.5 * ss * dex * rho
        qc = q_col[j1]
        keep &= ~(low(others, qc) > own + tol)  # another row is surely nearer to j
        need_col = keep & ~(up(others, qc) < own - tol)  # i is not surely j's nearest

    # Undecided rows: float32 against all of b.
    rows = (~sure).nonzero().squeeze(1)
    if rows.numel():
        ar, nar, bt = a[rows], na[rows], b.t()
        ch = max(1, size // n1)
        parts32 = _chunks(
            len(rows),
            ch,
            workers,
            lambda s: _top2(_sq_dist(ar[s : s + ch], nar[s : s + ch], bt, nb)),
        )
        bu = torch.cat([p[0] for p in parts32])
        ok = _ratio_ok(
            torch.cat([p[1] for p in parts32]), torch.cat([p[2] for p in parts32]), ratio
        )
        best[rows] = bu
        keep[rows] = ok
        dex[rows] = (ar - b[bu]).square().sum(1)
        if mutual:
            need_col[rows] = ok

    # Undecided mutual checks: the column's nearest row in float32 (the first of equals).
    if mutual:
        rows = need_col.nonzero().squeeze(1)
        if rows.numel():
            cols, where = torch.unique(best[rows], return_inverse=True)
            bc, nbc, at = b[cols], nb[cols], a.t()
            ch = max(1, size // n0)
            nearest32 = _chunks(
                len(cols),
                ch,
                workers,
                lambda s: _sq_dist(bc[s : s + ch], nbc[s : s + ch], at, na).min(1)[1],
            )
            keep[rows] = torch.cat(nearest32)[where] == rows

    return best, keep, torch.where(keep, dex, 0.0)


@dataclass
class MatchResult:
    path: Path
    pairs_path: Path | None
    pairs: int = 0
    matched: int = 0
    skipped: int = 0
    matches_total: int = 0
    seconds: float = 0.0
    per_pair: list[tuple[str, str, int]] = field(default_factory=list)


class _FeatureCache:
    """Descriptors on the device, least recently used evicted beyond ``capacity`` images."""

    def __init__(self, reader: Reader, device: torch.device, capacity: int = 64) -> None:
        self.reader, self.device, self.capacity = reader, device, capacity
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, name: str) -> torch.Tensor:
        if name in self._d:
            self._d.move_to_end(name)
            return self._d[name]
        desc = self.reader._f[name]["descriptors"][()]  # (D,N)
        t = torch.from_numpy(np.ascontiguousarray(desc.T)).to(self.device).float()
        self._d[name] = t
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return t


def match(
    features: str | Path,
    pairs: list[tuple[str, str]],
    out: str | Path,
    ratio: float | None = DEFAULT_RATIO,
    mutual: bool = True,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    pairs_out: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    inputs: tuple[str | Path, ...] = (),
    wait: bool = False,
) -> MatchResult:
    """Match every pair of images of a features file into a matches file (resumable).

    Each pair is stored under hloc's key, or under an escaped key where hloc's collides
    (see pairkeys.py). Before any work, OutputError when ``out`` or the pairs file is the
    features file or one of ``inputs`` (e.g. the pairs file read), or cannot be written;
    while it writes, ``out`` is locked (``wait``: wait for another writer to finish).
    Under ``torchrun`` with several processes each matches every N-th pair still to do into
    its own part file, rank 0 merges them into ``out`` and writes the pairs file, and every
    rank returns the run's totals.
    """
    features = Path(features)
    out = Path(out)
    device = torch.device(device)
    t0 = time.perf_counter()
    if pairs_out is None:
        pairs_out = out.with_name(out.stem + "-pairs.txt")
    refuse_inputs(out, (features, *inputs), "matches file")
    refuse_inputs(pairs_out, (features, out, *inputs), "pairs file to write")
    check_writable(pairs_out, "pairs file")
    with Reader(features, "features") as reader:
        if int(reader.attrs.get("descriptor_dim", 0)) <= 0:
            raise InputError(f"{features}: holds keypoints only (made by detect); run extract")
        known = set(reader.keys)
        for a, b in pairs:
            for n in (a, b):
                if n not in known:
                    raise InputError(f"{features}: has no image {n!r} named in the pairs")
        settings = {"ratio": ratio, "mutual": mutual}
        attrs = {
            "features": features.name,
            "method": reader.attrs.get("method", ""),
            "settings": settings_json(settings),
        }
        result = MatchResult(out, None)
        cache = _FeatureCache(reader, device)
        with (
            session(device) as d,
            Writer(
                out,
                "matches",
                attrs,
                must_match=("method", "settings"),
                overwrite=overwrite,
                shard=Shard(d.rank, d.world_size, d.barrier),
                wait=wait,
            ) as writer,
        ):
            plan = plan_keys(pairs, {k: writer.owners.get(k) for k in writer.done})
            for old, new in plan.renames.items():
                log.info("%s: %s moves to %s (its hloc key collides)", out, old, new)
                writer.rename(old, new)
            collide = sum(1 for p, k in plan.keys.items() if "/" not in k)
            if collide:
                log.warning(
                    "%s: %d pair(s) whose hloc keys collide (image names that differ only by "
                    "'/' and '-') are stored under escaped keys",
                    out,
                    collide,
                )
            pending = [p for p in pairs if p not in plan.done]
            result.skipped = len(pairs) - len(pending)
            todo = d.shard(pending)
            if d.active:
                log.info(
                    "rank %d of %d: %d of %d pairs", d.rank, d.world_size, len(todo), len(pending)
                )
            for i, (a, b) in enumerate(todo):
                key = plan.keys[(a, b)]
                m, s = match_descriptors(cache.get(a), cache.get(b), ratio, mutual)
                m_np = m.to(torch.int32).cpu().numpy()
                writer.write(
                    key,
                    {"matches0": m_np, "matching_scores0": s.cpu().numpy()},
                    {"name0": a, "name1": b},
                )
                count = int((m_np >= 0).sum())
                result.matched += 1
                result.matches_total += count
                result.per_pair.append((a, b, count))
                if progress:
                    progress(i + 1, len(todo), key)
            if d.active:
                ranks = d.gather(result)
                result.matched = sum(r.matched for r in ranks)
                result.matches_total = sum(r.matches_total for r in ranks)
                result.per_pair = [p for r in ranks for p in r.per_pair]
    result.pairs = len(pairs)
    if d.main:
        result.pairs_path = write_pairs(pairs_out, pairs)
    else:
        result.pairs_path = Path(pairs_out)
    result.seconds = time.perf_counter() - t0
    return result
