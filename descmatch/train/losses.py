"""Training losses of the descriptor nets: L2-Net, HardNet, SOSNet and two baselines.

Every loss is a pure function of a batch of matching descriptors: row ``i`` of ``anchors`` and
row ``i`` of ``positives`` describe two patches of the same 3D point, rows of different index
describe different points. Descriptors are usually L2-normalised (distances in ``[0, 2]``; a
central-surround net's two unit halves give distances in ``[0, 2 sqrt 2]``) but nothing here
relies on it. Every function returns a differentiable scalar tensor.

Each objective follows its paper term by term, with the paper's relative weights; where a loss
also offers another form, it is a named option (``LOSS_VARIANTS``), the paper's form first and
the default.

Negatives are always taken inside the batch. Entries that must not act as a negative (the
matching pair itself, near-duplicates) are replaced by ``+inf`` before a minimum is taken, so they
can never be picked; a row left with no valid negative gives a zero hinge term.

``LOSSES`` maps a loss name to its function; every entry takes ``(anchors, positives)``
positionally and its own options as keywords. ``get_loss`` looks a name up and
``check_loss_options`` validates options; both raise ``ConfigError`` listing the valid values.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
    ``loss = mean_i max(0, margin + d_pos[i] - d_neg[i])`` (the paper's, margin 1). Off-diagonal
    entries with ``D < duplicate_thresh`` (0.008, as in the original code) are taken for
    duplicates of the same point and excluded, like the diagonal. ``constant_negatives``: no
    gradient flows through ``d_neg`` (AffNet's "hard negative-constant" loss, for a net that
    shapes the patches of a fixed descriptor: only the positive pairs are pulled together,
    while the hinge still follows the hardest negative).

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

    First order (FOS): ``d_neg[i]`` is the smallest of ``||a_i - a_j||``, ``||a_i - p_j||``,
    ``||p_i - a_j||``, ``||p_i - p_j||`` over ``j != i`` (entries below ``duplicate_thresh``
    excluded as in ``hardnet_loss``; 0 disables this); ``FOS = mean_i max(0, margin + d_pos[i]
    - d_neg[i])^2`` (the paper's margin 1).

    Second order (SOSR): ``Da = distance_matrix(a, a)``, ``Dp = distance_matrix(p, p)``; ``c_i``
    is the union of the ``knn`` nearest neighbours of ``a_i`` among the anchors and of ``p_i``
    among the positives (i excluded; chosen on detached distances; the paper's k = 8, capped at
    N-1); ``SOSR = mean_i sqrt(sum_{j in c_i} (Da[i,j] - Dp[i,j])^2)``.
    ``loss = FOS + sos_weight * SOSR`` (the paper's weight 1).

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    n = _check_pair(anchors, positives)
    d_ap = distance_matrix(anchors, positives)
    d_aa = distance_matrix(anchors, anchors)
    d_pp = distance_matrix(positives, positives)
    d_pos = d_ap.diagonal()
    masked_ap = _mask_negatives(d_ap, duplicate_thresh)
    d_neg = torch.minimum(
        torch.minimum(
            _mask_negatives(d_aa, duplicate_thresh).min(dim=1).values,
            _mask_negatives(d_pp, duplicate_thresh).min(dim=1).values,
        ),
        torch.minimum(masked_ap.min(dim=1).values, masked_ap.min(dim=0).values),
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


#: Contrastive forms: ``squared`` (the hinge on the squared distance: ``max(0, m - d^2)``),
#: ``hadsell`` (the hinge on the distance, squared: ``max(0, m - d)^2``, Hadsell et al. 2006).
CONTRASTIVE_FORMS = ("squared", "hadsell")


def contrastive_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 1.0,
    generator: torch.Generator | None = None,
    form: str = "squared",
) -> Tensor:
    """Contrastive loss with one in-batch negative per anchor.

    The negative of anchor i is positive ``(i - s) mod N`` for one shift ``s`` drawn uniformly
    from ``1..N-1`` (``torch.randint`` with ``generator``; the positives rolled by ``s``), so it
    is never the matching positive. With ``d+[i] = ||a_i - p_i||`` and ``d-[i]`` the negative
    distance, the loss is the mean over the 2N pairs:
    ``form="squared"`` (default): ``1/2 (mean_i d+[i]^2 + mean_i max(0, margin - d-[i]^2))``;
    ``form="hadsell"``: ``1/2 (mean_i d+[i]^2 + mean_i max(0, margin - d-[i])^2)``.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    _check_choice("contrastive form", form, CONTRASTIVE_FORMS)
    n = _check_pair(anchors, positives)
    shift = int(torch.randint(1, n, (1,), generator=generator).item())
    negatives = torch.roll(positives, shifts=shift, dims=0)
    pos_sq = (anchors - positives).pow(2).sum(dim=1)
    neg_sq = (anchors - negatives).pow(2).sum(dim=1)
    if form == "squared":
        neg_term = (margin - neg_sq).clamp(min=0)
    else:
        neg_term = (margin - torch.sqrt(neg_sq.clamp(min=1e-8))).clamp(min=0).pow(2)
    return 0.5 * (pos_sq.mean() + neg_term.mean())


#: Triplet forms: ``squared`` distances (``max(0, margin + d(a,p)^2 - d(a,n)^2)``, the FaceNet
#: triplet loss), ``distance`` (``max(0, margin + d(a,p) - d(a,n))``).
TRIPLET_FORMS = ("squared", "distance")
TRIPLET_MINING = ("random", "semihard")


def triplet_loss(
    anchors: Tensor,
    positives: Tensor,
    margin: float = 1.0,
    mining: str = "random",
    generator: torch.Generator | None = None,
    form: str = "squared",
) -> Tensor:
    """Triplet margin loss with a random or a semi-hard in-batch negative.

    The negative of anchor i is a positive ``p_j``, ``j != i``. ``mining="random"``: ``j`` drawn
    uniformly for each anchor independently (``torch.randint`` with ``generator``).
    ``mining="semihard"``: the closest ``p_j`` strictly farther from ``a_i`` than ``p_i``; where
    there is none, the closest ``p_j`` (hardest). The choice is made on detached distances.
    ``form="squared"`` (default): ``loss = mean_i max(0, margin + ||a_i - p_i||^2 -
    ||a_i - p_j||^2)``; ``form="distance"``: the same with distances.

    Shape: anchors (N,D), positives (N,D) -> scalar.
    """
    _check_choice("triplet form", form, TRIPLET_FORMS)
    _check_choice("triplet mining", mining, TRIPLET_MINING)
    n = _check_pair(anchors, positives)
    d = (
        squared_distance_matrix(anchors, positives)
        if form == "squared"
        else (distance_matrix(anchors, positives))
    )
    d_pos = d.diagonal()
    if mining == "random":
        offsets = torch.randint(1, n, (n,), generator=generator)
        neg_idx = ((torch.arange(n) + offsets) % n).to(d.device)
    else:
        dd = d.detach()
        eye = torch.eye(n, dtype=torch.bool, device=d.device)
        others = dd.masked_fill(eye, float("inf"))
        farther = (dd > d_pos.detach().unsqueeze(1)) & ~eye
        semi = others.masked_fill(~farther, float("inf")).argmin(dim=1)
        hardest = others.argmin(dim=1)
        neg_idx = torch.where(farther.any(dim=1), semi, hardest)
    d_neg = d.gather(1, neg_idx.unsqueeze(1)).squeeze(1)
    return (margin + d_pos - d_neg).clamp(min=0).mean()


LOSSES: dict[str, Callable[..., Tensor]] = {
    "l2net": l2net_loss,
    "hardnet": hardnet_loss,
    "sosnet": sosnet_loss,
    "contrastive": contrastive_loss,
    "triplet": triplet_loss,
}

#: The named variants of each loss: option -> its choices, the default (the paper's form) first.
LOSS_VARIANTS: dict[str, dict[str, tuple[str, ...]]] = {
    "l2net": {"e2": E2_FORMS, "e3": L2NET_E3_FORMS, "reduction": REDUCTIONS},
    "hardnet": {},
    "sosnet": {},
    "contrastive": {"form": CONTRASTIVE_FORMS},
    "triplet": {"form": TRIPLET_FORMS, "mining": TRIPLET_MINING},
}


def get_loss(name: str) -> Callable[..., Tensor]:
    """The loss function registered under ``name``; ``ConfigError`` lists the valid names."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; valid: {', '.join(sorted(LOSSES))}") from None


def check_loss_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate keyword options of loss ``name``: each must be one of its keywords and, for a
    named variant, one of its choices. Returns them as a dict; ``ConfigError`` lists the valid
    keywords or choices."""
    fn = get_loss(name)
    params = list(inspect.signature(fn).parameters)[2:]
    valid = [p for p in params if p not in ("feats_a", "feats_p", "generator")]
    for key, value in options.items():
        if key not in valid:
            raise ConfigError(
                f"loss {name!r} has no option {key!r}; valid: {', '.join(sorted(valid))}"
            )
        choices = LOSS_VARIANTS[name].get(key)
        if choices is not None:
            _check_choice(f"{name} {key}", str(value), choices)
    return dict(options)
