"""The matcher's bf16/fp16 path: the distance products in reduced precision, with a
rounding-error bound per row and column; every decision the bound leaves open is re-made in
float32, so the matches equal the fp32 path's (:mod:`descmatch.matcher`)."""

from __future__ import annotations

import math
import threading

import torch

from .matcher import (
    _CPU_CHUNK_ELEMENTS,
    _EPS32,
    _SAFETY,
    _chunks,
    _ratio_ok,
    _sq_dist,
    _top2,
    _Workers,
)


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


def match_reduced(
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
