"""Training losses of the descriptor nets: L2-Net, HardNet, SOSNet and two baselines.

Every loss is a pure function of a batch of matching descriptors: row ``i`` of ``anchors`` and
row ``i`` of ``positives`` describe two patches of the same 3D point, rows of different index
describe different points. Descriptors are expected L2-normalised (distances in ``[0, 2]``) but
nothing here relies on it. Every function returns a differentiable scalar tensor.

Negatives are always taken inside the batch. Entries that must not act as a negative (the
matching pair itself, near-duplicates) are replaced by ``+inf`` before a minimum is taken, so they
can never be picked; a row left with no valid negative gives a zero hinge term.

``LOSSES`` maps a loss name to its function; every entry takes ``(anchors, positives)``
positionally and its own options as keywords. ``get_loss`` looks a name up and raises
``ConfigError`` listing the valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

#: Off-diagonal distances below this are treated as duplicates of the positive and never used
#: as negatives (the value of the original HardNet code).
DUPLICATE_THRESH = 0.008


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


def distance_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pairwise Euclidean distances ``D[i,j] = ||a_i - b_j||``.

    Computed as ``sqrt(max(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, eps))``: the clamp keeps the value and
    the gradient finite for coincident vectors (their distance reads ``sqrt(eps)``).

    Shape: a (N,D), b (M,D) -> (N,M).
    """
    sq = (a * a).sum(dim=1, keepdim=True) + (b * b).sum(dim=1).unsqueeze(0) - 2.0 * (a @ b.t())
    return torch.sqrt(sq.clamp(min=eps))


def _relative_loss(logits: Tensor) -> Tensor:
    """L2-Net's relative loss on a similarity matrix ``S = exp(logits)``.

    ``-1/2 (mean_i log s_c[i,i] + mean_i log s_r[i,i])`` with ``s_c`` normalised over each column
    and ``s_r`` over each row, via log-softmax. Shape: (N,N) -> scalar.
    """
    col = F.log_softmax(logits, dim=0).diagonal()
    row = F.log_softmax(logits, dim=1).diagonal()
    return -0.5 * (col.mean() + row.mean())


def l2net_e1(anchors: Tensor, positives: Tensor) -> Tensor:
    """L2-Net E1, the relative distance loss.

    ``D = distance_matrix(a, p)``, ``S = exp(2 - D)``; ``s_c[i,j] = S[i,j] / sum_k S[k,j]``,
    ``s_r[i,j] = S[i,j] / sum_k S[i,k]``;
    ``E1 = -1/2 (mean_i log s_c[i,i] + mean_i log s_r[i,i])``.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    _check_pair(anchors, positives)
    return _relative_loss(2.0 - distance_matrix(anchors, positives))


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


def l2net_e2(anchors: Tensor, positives: Tensor, eps: float = 1e-8, mean: bool = True) -> Tensor:
    """L2-Net E2, the decorrelation of descriptor dimensions.

    For each descriptor set ``Y`` (anchors, positives) ``R[i,j]`` is the Pearson correlation
    between dimensions i and j over the batch (each column centred and divided by its norm, so
    ``R[i,i] = 1``); the paper's sum is ``1/2 (sum_{i!=j} R_a[i,j]^2 + sum_{i!=j}
    R_p[i,j]^2)``, and with ``mean`` (the default) it is divided by the ``D(D-1)`` pairs.

    Why the mean: the sum's floor for independent dimensions is about ``D(D-1)/N`` (32 for
    128-D descriptors in batches of 512), and its gradient is mostly that sampling noise:
    measured on a batch of 512 pool pairs, the summed E2's gradient norm was 141 against
    E1's 1.0, and a run with E1 + summed E2 + E3 lost ground (validation FPR95 5.2% at step
    200, 6.7% at step 400). The mean keeps the penalty on real correlation between
    dimensions at the scale of E1. A dimension with zero variance contributes 0 (its norm is
    clamped at ``sqrt(eps)``).

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    _check_pair(anchors, positives)
    e2 = 0.5 * (_off_diagonal_correlation(anchors, eps) + _off_diagonal_correlation(positives, eps))
    d = anchors.shape[1]
    return e2 / max(1, d * (d - 1)) if mean else e2


def l2net_e3(feats_a: Sequence[Tensor], feats_p: Sequence[Tensor]) -> Tensor:
    """L2-Net E3, intermediate supervision on feature maps.

    For each pair of maps each sample is flattened and L2-normalised, ``S = exp(<f_a_i, f_p_j>)``
    and the relative loss of E1 is applied to it (negative mean log-probability of the diagonal
    under column- and row-wise softmax, halved); the terms of the maps are summed. Empty lists
    give 0.

    Shape: feats_a, feats_p: lists of (N,C,H,W) (pairwise equal shapes) -> scalar.
    """
    if len(feats_a) != len(feats_p):
        raise ValueError(f"{len(feats_a)} anchor feature maps but {len(feats_p)} positive ones")
    total: Tensor | None = None
    for fa, fp in zip(feats_a, feats_p, strict=True):
        if fa.shape != fp.shape:
            raise ValueError(f"feature maps differ in shape: {tuple(fa.shape)} {tuple(fp.shape)}")
        va = F.normalize(fa.flatten(1), p=2.0, dim=1, eps=1e-10)
        vp = F.normalize(fp.flatten(1), p=2.0, dim=1, eps=1e-10)
        term = _relative_loss(va @ vp.t())
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


def l2net_loss(
    anchors: Tensor,
    positives: Tensor,
    feats_a: Sequence[Tensor] | None = None,
    feats_p: Sequence[Tensor] | None = None,
) -> Tensor:
    """L2-Net's full loss ``E1 + E2 + E3`` (Tian et al., CVPR'17); E3 only with feature maps.

    Shape: anchors (N,D), positives (N,D), feats: lists of (N,C,H,W) or None -> scalar.
    """
    if (feats_a is None) != (feats_p is None):
        raise ValueError("give both feats_a and feats_p, or neither")
    loss = l2net_e1(anchors, positives) + l2net_e2(anchors, positives)
    if feats_a is not None and feats_p is not None:
        loss = loss + l2net_e3(feats_a, feats_p)
    return loss


def hardnet_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 1.0,
    anchor_swap: bool = True,
    duplicate_thresh: float = DUPLICATE_THRESH,
    constant_negatives: bool = False,
) -> Tensor:
    """HardNet's hardest-in-batch triplet margin loss (Mishchuk et al., NIPS'17).

    ``D = distance_matrix(a, p)``, ``d_pos[i] = D[i,i]``; the hardest negative of pair i is
    ``min_{j!=i} D[i,j]`` (nearest other positive to anchor i) and, with ``anchor_swap``, also
    ``min_{j!=i} D[j,i]`` (nearest other anchor to positive i); the smaller one is ``d_neg[i]``.
    ``loss = mean_i max(0, margin + d_pos[i] - d_neg[i])``. Off-diagonal entries with
    ``D < duplicate_thresh`` (0.008, as in the original code) are taken for duplicates of the
    same point and excluded, like the diagonal. ``constant_negatives``: no gradient flows
    through ``d_neg`` (AffNet's "hard negative-constant" loss, for a net that shapes the
    patches of a fixed descriptor: only the positive pairs are pulled together, while the
    hinge still follows the hardest negative).

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    _check_pair(anchors, positives)
    d = distance_matrix(anchors, positives)
    d_pos = d.diagonal()
    masked = _mask_negatives(d.detach() if constant_negatives else d, duplicate_thresh)
    d_neg = masked.min(dim=1).values
    if anchor_swap:
        d_neg = torch.minimum(d_neg, masked.min(dim=0).values)
    return (margin + d_pos - d_neg).clamp(min=0).mean()


def sosnet_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 1.0,
    knn: int = 8,
    sos_weight: float = 1.0,
    duplicate_thresh: float = DUPLICATE_THRESH,
) -> Tensor:
    """SOSNet's loss (Tian et al., CVPR'19): first-order squared hinge plus the SOS regulariser.

    First order: ``d_neg[i]`` is the smallest of ``||a_i - a_j||``, ``||a_i - p_j||``,
    ``||p_i - a_j||``, ``||p_i - p_j||`` over ``j != i`` (entries below ``duplicate_thresh``
    excluded as in ``hardnet_loss``); ``FOS = mean_i max(0, margin + d_pos[i] - d_neg[i])^2``.

    Second order: ``Da = distance_matrix(a, a)``, ``Dp = distance_matrix(p, p)``; ``N_i`` is the
    union of the ``knn`` nearest neighbours of i in anchor space and in positive space (i
    excluded; neighbours chosen on detached distances, ``knn`` capped at N-1);
    ``SOSR = mean_i sqrt(sum_{j in N_i} (Da[i,j] - Dp[i,j])^2)``.
    ``loss = FOS + sos_weight * SOSR``.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    n = _check_pair(anchors, positives)
    d_ap = distance_matrix(anchors, positives)
    d_aa = distance_matrix(anchors, anchors)
    d_pp = distance_matrix(positives, positives)
    d_pos = d_ap.diagonal()
    d_neg = torch.minimum(
        torch.minimum(
            _mask_negatives(d_aa, duplicate_thresh).min(dim=1).values,
            _mask_negatives(d_pp, duplicate_thresh).min(dim=1).values,
        ),
        torch.minimum(
            _mask_negatives(d_ap, duplicate_thresh).min(dim=1).values,
            _mask_negatives(d_ap, duplicate_thresh).min(dim=0).values,
        ),
    )
    fos = (margin + d_pos - d_neg).clamp(min=0).pow(2).mean()

    k = min(int(knn), n - 1)
    if k <= 0 or sos_weight == 0:
        return fos
    eye = torch.eye(n, dtype=torch.bool, device=anchors.device)
    nn_a = d_aa.detach().masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    nn_p = d_pp.detach().masked_fill(eye, float("inf")).topk(k, dim=1, largest=False).indices
    neighbours = torch.zeros(n, n, dtype=torch.bool, device=anchors.device)
    neighbours.scatter_(1, nn_a, True)
    neighbours.scatter_(1, nn_p, True)
    sq = ((d_aa - d_pp).pow(2) * neighbours.to(d_aa.dtype)).sum(dim=1)
    sosr = _safe_sqrt(sq).mean()
    return fos + sos_weight * sosr


def _pair_distance(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise ``||x_i - y_i||`` with the clamp of ``distance_matrix``. Shape: (N,D) -> (N,)."""
    return torch.sqrt((x - y).pow(2).sum(dim=1).clamp(min=eps))


def contrastive_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Contrastive loss (Hadsell et al.) with one in-batch negative per anchor.

    The negative of anchor i is positive ``(i - s) mod N`` for one shift ``s`` drawn uniformly
    from ``1..N-1`` (``torch.randint`` with ``generator``; the positives rolled by ``s``), so it
    is never the matching positive. With ``d+[i] = ||a_i - p_i||`` and ``d-[i]`` the negative
    distance, ``loss = 1/2 (mean_i d+[i]^2 + mean_i max(0, margin - d-[i])^2)``: the mean over
    the 2N pairs.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    n = _check_pair(anchors, positives)
    shift = int(torch.randint(1, n, (1,), generator=generator).item())
    negatives = torch.roll(positives, shifts=shift, dims=0)
    pos_sq = (anchors - positives).pow(2).sum(dim=1)
    neg = _pair_distance(anchors, negatives)
    return 0.5 * (pos_sq.mean() + (margin - neg).clamp(min=0).pow(2).mean())


def triplet_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 1.0,
    mining: str = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Triplet margin loss with a random or a semi-hard in-batch negative.

    The negative of anchor i is a positive ``p_j``, ``j != i``. ``mining="random"``: ``j`` drawn
    uniformly for each anchor independently (``torch.randint`` with ``generator``).
    ``mining="semihard"``: the closest ``p_j`` strictly farther from ``a_i`` than ``p_i``; where
    there is none, the closest ``p_j`` (hardest). The choice is made on detached distances.
    ``loss = mean_i max(0, margin + ||a_i - p_i|| - ||a_i - p_j||)``.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    n = _check_pair(anchors, positives)
    d = distance_matrix(anchors, positives)
    d_pos = d.diagonal()
    if mining == "random":
        offsets = torch.randint(1, n, (n,), generator=generator)
        neg_idx = ((torch.arange(n) + offsets) % n).to(d.device)
    elif mining == "semihard":
        dd = d.detach()
        eye = torch.eye(n, dtype=torch.bool, device=d.device)
        others = dd.masked_fill(eye, float("inf"))
        farther = (dd > d_pos.detach().unsqueeze(1)) & ~eye
        semi = others.masked_fill(~farther, float("inf")).argmin(dim=1)
        hardest = others.argmin(dim=1)
        neg_idx = torch.where(farther.any(dim=1), semi, hardest)
    else:
        raise ConfigError(f"unknown triplet mining {mining!r}; valid: random, semihard")
    d_neg = d.gather(1, neg_idx.unsqueeze(1)).squeeze(1)
    return (margin + d_pos - d_neg).clamp(min=0).mean()


LOSSES: dict[str, Callable[..., Tensor]] = {
    "l2net": l2net_loss,
    "hardnet": hardnet_loss,
    "sosnet": sosnet_loss,
    "contrastive": contrastive_loss,
    "triplet": triplet_loss,
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered under ``name``; ``ConfigError`` lists the valid names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None
