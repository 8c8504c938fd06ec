"""Mutual nearest neighbour + Lowe's ratio test as chunked matrix products on the device.

The fp32 path is the reference; bf16/fp16 products (:mod:`descmatch.matcher_reduced`) re-make
in fp32 every decision their rounding-error bound leaves open, so they give its matches.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

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
    from .matcher_reduced import match_reduced  # it builds on this module's helpers

    return (
        *match_reduced(a, na, b, nb, ratio, mutual, max_elements, dtype, workers),
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
