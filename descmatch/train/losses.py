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
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .l2netloss import E2_FORMS, L2NET_E3_FORMS
from .l2netloss import l2net_e1 as l2net_e1
from .l2netloss import l2net_e2 as l2net_e2
from .l2netloss import l2net_e3 as l2net_e3
from .l2netloss import l2net_loss as l2net_loss
from .losscore import DUPLICATE_THRESH as DUPLICATE_THRESH
from .losscore import REDUCTIONS, _check_choice, _check_pair, _mask_negatives, _safe_sqrt
from .losscore import distance_matrix as distance_matrix
from .losscore import squared_distance_matrix as squared_distance_matrix


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
