"""L2-Net's loss (Tian et al., CVPR'17): E1 (relative distance), E2 (descriptor compactness)
and E3 (intermediate feature maps), term by term with the paper's weights (see
:mod:`.losses`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .losscore import REDUCTIONS, _check_choice, _check_pair, _reduce, distance_matrix


def _relative_loss_sum(logits: Tensor) -> Tensor:
    """L2-Net's relative loss on a similarity matrix ``S = exp(logits)``, summed over pairs.

    ``-1/2 (sum_i log s_c[i,i] + sum_i log s_r[i,i])`` with ``s_c[i,j] = S[i,j] / sum_k S[k,j]``
    (each column normalised) and ``s_r[i,j] = S[i,j] / sum_k S[i,k]`` (each row), computed with
    log-softmax so large logits cannot overflow. Shape: (N,N) -> scalar.
    """
    col = F.log_softmax(logits, dim=0).diagonal()
    row = F.log_softmax(logits, dim=1).diagonal()
    return -0.5 * (col.sum() + row.sum())


def l2net_e1(anchors: Tensor, positives: Tensor, reduction: str = "mean") -> Tensor:
    """L2-Net E1, the relative distance loss (Tian et al., CVPR'17, eq. for E1).

    ``D = distance_matrix(a, p)``, ``S = exp(2 - D)``; ``s_c[i,j] = S[i,j] / sum_k S[k,j]``,
    ``s_r[i,j] = S[i,j] / sum_k S[i,k]``; the paper's
    ``E1 = -1/2 (sum_i log s_c[i,i] + sum_i log s_r[i,i])``. ``reduction="mean"`` (default)
    returns ``E1 / N``, ``"sum"`` the paper's sum.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    n = _check_pair(anchors, positives)
    return _reduce(_relative_loss_sum(2.0 - distance_matrix(anchors, positives)), n, reduction)


def _off_diagonal_correlation(x: Tensor, eps: float) -> Tensor:
    """Sum over ``i != j`` of the squared Pearson correlation of dimensions i and j.

    Shape: (N,D) -> scalar.
    """
    xc = x - x.mean(dim=0, keepdim=True)
    norm = torch.sqrt((xc * xc).sum(dim=0, keepdim=True).clamp(min=eps))
    xn = xc / norm
    r = xn.t() @ xn
    off = r - torch.diag_embed(r.diagonal())
    return (off * off).sum()


def l2net_e2(
    anchors: Tensor, positives: Tensor, eps: float = 1e-8, reduction: str = "mean"
) -> Tensor:
    """L2-Net E2, the compactness term: decorrelation of descriptor dimensions.

    For each descriptor set ``Y`` (anchors, positives) ``R[i,j]`` is the Pearson correlation
    between dimensions i and j over the batch (column ``b_i`` of ``Y`` centred, ``R[i,j] =
    (b_i - mean b_i).(b_j - mean b_j) / (||b_i - mean b_i|| ||b_j - mean b_j||)``, so
    ``R[i,i] = 1``); the paper's ``E2 = 1/2 (sum_{i!=j} R_a[i,j]^2 + sum_{i!=j} R_p[i,j]^2)``.
    ``reduction="mean"`` (default) returns ``E2 / N`` with N the number of pairs: the factor
    E1 and E3 are divided by, so ``E1 + E2 + E3`` is the paper's sum divided by N, with the
    paper's relative weights. ``"sum"`` is the paper's sum. A dimension with zero variance
    contributes 0 (its norm is clamped at ``sqrt(eps)``).

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    n = _check_pair(anchors, positives)
    e2 = 0.5 * (_off_diagonal_correlation(anchors, eps) + _off_diagonal_correlation(positives, eps))
    return _reduce(e2, n, reduction)


#: E3's similarity of two feature maps: ``inner`` the inner product of the vectorised maps
#: (the paper's), ``cosine`` the inner product of the maps each scaled to unit length.
E3_SIMILARITIES = ("inner", "cosine")
#: ``e3`` of :func:`l2net_loss`: an E3 similarity, or ``none`` (no intermediate supervision).
L2NET_E3_FORMS = (*E3_SIMILARITIES, "none")


def l2net_e3(
    feats_a: Sequence[Tensor],
    feats_p: Sequence[Tensor],
    reduction: str = "mean",
    similarity: str = "inner",
) -> Tensor:
    """L2-Net E3, intermediate supervision: E1's relative loss on intermediate feature maps.

    For each supervised layer, ``o_i`` and ``o'_j`` the vectorised maps of anchor i and
    positive j, ``G[i,j] = <o_i, o'_j>`` (the inner product, ``similarity="inner"``, the
    paper's) and the relative loss of E1 on ``S = exp(G)``:
    ``-1/2 (sum_i log v_c[i,i] + sum_i log v_r[i,i])``, ``v_c``/``v_r`` column/row-normalised
    ``S``; the layers' terms are summed. ``similarity="cosine"`` scales each map to unit
    length first (logits in [-1, 1]; in [0, 1] for maps after a ReLU, a nearly flat softmax).
    ``reduction="mean"`` (default) divides by N, as E1 and E2. Empty lists give 0.

    Shape: feats_a, feats_p: lists of (N,C,H,W) (pairwise equal shapes) -> scalar.
    """
    _check_choice("E3 similarity", similarity, E3_SIMILARITIES)
    _check_choice("reduction", reduction, REDUCTIONS)
    if len(feats_a) != len(feats_p):
        raise ValueError(f"{len(feats_a)} anchor feature maps but {len(feats_p)} positive ones")
    total: Tensor | None = None
    for fa, fp in zip(feats_a, feats_p, strict=True):
        if fa.shape != fp.shape:
            raise ValueError(f"feature maps differ in shape: {tuple(fa.shape)} {tuple(fp.shape)}")
        va, vp = fa.flatten(1), fp.flatten(1)
        if similarity == "cosine":
            va = F.normalize(va, p=2.0, dim=1, eps=1e-10)
            vp = F.normalize(vp, p=2.0, dim=1, eps=1e-10)
        term = _reduce(_relative_loss_sum(va @ vp.t()), int(fa.shape[0]), reduction)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


#: L2-Net's E2 forms: ``paper`` (weight 1 against E1 and E3), ``dim-mean`` (E2 divided by
#: D(D-1) instead of N: about D(D-1)/N times weaker than the paper's), ``none`` (no E2).
E2_FORMS = ("paper", "dim-mean", "none")


def l2net_loss(
    anchors: Tensor,
    positives: Tensor,
    feats_a: Sequence[Tensor] | None = None,
    feats_p: Sequence[Tensor] | None = None,
    *,
    reduction: str = "mean",
    e2: str = "paper",
    e3: str = "inner",
) -> Tensor:
    """L2-Net's loss ``E1 + E2 + E3`` (Tian et al., CVPR'17); E3 only with feature maps.

    With the default ``reduction="mean"`` the value is the paper's ``E1 + E2 + E3`` divided by
    N, the number of pairs (one global factor: each term's sum is divided by N); ``"sum"`` is the
    paper's value. Named variants: ``e2`` (``E2_FORMS``), ``e3`` the similarity of E3
    (``E3_SIMILARITIES``) or ``none`` (no E3); the paper's forms are the defaults.

    Shape: anchors (N,D), positives (N,D), feats: lists of (N,C,H,W) or None -> scalar.
    """
    _check_choice("E2 form", e2, E2_FORMS)
    _check_choice("reduction", reduction, REDUCTIONS)
    if (feats_a is None) != (feats_p is None):
        raise ValueError("give both feats_a and feats_p, or neither")
    loss = l2net_e1(anchors, positives, reduction=reduction)
    if e2 == "paper":
        loss = loss + l2net_e2(anchors, positives, reduction=reduction)
    elif e2 == "dim-mean":
        d = int(anchors.shape[1])
        e2_sum = l2net_e2(anchors, positives, reduction="sum")
        scale = float(max(1, d * (d - 1)))
        if reduction == "sum":
            scale /= int(anchors.shape[0])
        loss = loss + e2_sum / scale
    _check_choice("E3 form", e3, L2NET_E3_FORMS)
    if feats_a is not None and feats_p is not None and e3 != "none":
        loss = loss + l2net_e3(feats_a, feats_p, reduction=reduction, similarity=e3)
    return loss
