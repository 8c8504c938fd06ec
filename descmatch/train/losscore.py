"""What the descriptor losses share: batch checks, reductions, distance matrices and the masking
of non-negatives (see :mod:`.losses`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError

#: Off-diagonal distances below this are treated as duplicates of the positive and never used
#: as negatives (the value of the original HardNet code).
DUPLICATE_THRESH = 0.008

#: How the L2-Net terms are reduced: ``mean`` divides each of the paper's sums by the number of
#: pairs N (one global factor 1/N, so E1 : E2 : E3 keep the paper's weights), ``sum`` is the
#: paper's sums verbatim.
REDUCTIONS = ("mean", "sum")


def _check_pair(a: Tensor, p: Tensor, min_rows: int = 2) -> int:
    if a.dim() != 2 or p.dim() != 2:
        raise ValueError(
            f"descriptors must be 2-D (N,D); got {tuple(a.shape)} and {tuple(p.shape)}"
        )
    if a.shape != p.shape:
        raise ValueError(f"anchors {tuple(a.shape)} and positives {tuple(p.shape)} differ in shape")
    n = int(a.shape[0])
    if n < min_rows:
        raise ValueError(f"a batch needs at least {min_rows} pairs; got {n}")
    return n


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


def _reduce(total: Tensor, n: int, reduction: str) -> Tensor:
    _check_choice("reduction", reduction, REDUCTIONS)
    return total / n if reduction == "mean" else total


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with an exact 0 at 0 and a finite (zero) gradient there. Shape: any -> same."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


def _mask_negatives(d: Tensor, duplicate_thresh: float) -> Tensor:
    """Replace the diagonal and near-duplicate entries (``d < duplicate_thresh``) by ``+inf``.

    Shape: (N,N) -> (N,N).
    """
    n = d.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=d.device)
    bad = eye | (d.detach() < duplicate_thresh)
    return d.masked_fill(bad, float("inf"))


def squared_distance_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``||a_i - b_j||^2``, clamped at 0.

    Shape: a (N,D), b (M,D) -> (N,M).
    """
    sq = (a * a).sum(dim=1, keepdim=True) + (b * b).sum(dim=1).unsqueeze(0) - 2.0 * (a @ b.t())
    return sq.clamp(min=0.0)


def distance_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pairwise Euclidean distances ``D[i,j] = ||a_i - b_j||``.

    Computed as ``sqrt(max(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, eps))``: the clamp keeps the value and
    the gradient finite for coincident vectors (their distance reads ``sqrt(eps)``).

    Shape: a (N,D), b (M,D) -> (N,M).
    """
    return torch.sqrt(squared_distance_matrix(a, b).clamp(min=eps))
