"""Training losses against the papers' formulas worked by hand on tiny inputs, against
independent loop implementations, and against the invariances the papers imply.

The hand values are written as the arithmetic of the paper's definition (sums over pairs, the
paper's weights); the library's default ``reduction="mean"`` divides every L2-Net term by the
number of pairs N, one global factor, which the tests check as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from descmatch.errors import ConfigError
from descmatch.train.losses import (
    LOSS_VARIANTS,
    LOSSES,
    check_loss_options,
    contrastive_loss,
    distance_matrix,
    get_loss,
    hardnet_loss,
    l2net_e1,
    l2net_e2,
    l2net_e3,
    l2net_loss,
    sosnet_loss,
    triplet_loss,
)

E = math.exp
LOG = math.log
SQ = math.sqrt


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def t(x: np.ndarray | list[list[float]]) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64))


def angles(*deg: float) -> np.ndarray:
    """Unit 2-D vectors at the given angles (degrees)."""
    r = np.radians(np.asarray(deg, dtype=np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def np_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((len(a), len(b)))
    for i in range(len(a)):
        for j in range(len(b)):
            out[i, j] = math.sqrt(sum((a[i, k] - b[j, k]) ** 2 for k in range(a.shape[1])))
    return out


# Two pairs in 2-D used by several hand computations:
#   a0 = (1, 0), a1 = (0, 1); p0 = (0.6, 0.8), p1 = (0.28, 0.96)
#   d00 = |a0 - p0| = sqrt(0.16 + 0.64) = sqrt(0.8)   d01 = |a0 - p1| = sqrt(0.5184 + 0.9216) = 1.2
#   d10 = |a1 - p0| = sqrt(0.36 + 0.04) = sqrt(0.4)   d11 = |a1 - p1| = sqrt(0.0784 + 0.0016)
#   and within each set: |a0 - a1| = sqrt(2), |p0 - p1| = |(0.32, -0.16)| = sqrt(0.128)
A2 = [[1.0, 0.0], [0.0, 1.0]]
P2 = [[0.6, 0.8], [0.28, 0.96]]
D00, D01, D10, D11 = SQ(0.8), 1.2, SQ(0.4), SQ(0.08)


def test_distance_matrix_matches_numpy_and_is_safe() -> None:
    d = distance_matrix(t(A2), t(P2))
    np.testing.assert_allclose(d.numpy(), [[D00, D01], [D10, D11]], atol=1e-9)
    x = t(A2).requires_grad_()
    distance_matrix(x, x).sum().backward()
    assert torch.isfinite(x.grad).all()


# -- L2-Net ---------------------------------------------------------------------------------


def test_l2net_e1_by_hand() -> None:
    # S = exp(2 - D); the factor e^2 cancels in every normalisation.
    s_c00 = E(-D00) / (E(-D00) + E(-D10))  # column 0: S00 / (S00 + S10)
    s_c11 = E(-D11) / (E(-D01) + E(-D11))  # column 1: S11 / (S01 + S11)
    s_r00 = E(-D00) / (E(-D00) + E(-D01))  # row 0: S00 / (S00 + S01)
    s_r11 = E(-D11) / (E(-D10) + E(-D11))  # row 1: S11 / (S10 + S11)
    e1_sum = -0.5 * (LOG(s_c00) + LOG(s_c11) + LOG(s_r00) + LOG(s_r11))
    assert l2net_e1(t(A2), t(P2), reduction="sum").item() == pytest.approx(e1_sum, rel=1e-6)
    assert l2net_e1(t(A2), t(P2)).item() == pytest.approx(e1_sum / 2, rel=1e-6)


# Three pairs in 2-D for E2. Anchor dimensions (columns) b0 = (1, 0, -1), b1 = (0, 1, -1):
# both have mean 0, b0.b1 = 0 + 0 + 1 = 1, |b0| = |b1| = sqrt 2, so r01 = r10 = 1/2.
# Positive columns (1, -1, 0) and (1, 1, -2): means 0, dot 1 - 1 + 0 = 0, so r01 = 0.
# Paper: E2 = 1/2 (sum_{i!=j} r_a^2 + sum_{i!=j} r_p^2) = 1/2 (2 * 1/4 + 0) = 1/4.
A3 = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]
P3 = [[1.0, 1.0], [-1.0, 1.0], [0.0, -2.0]]
E2_SUM = 0.25


def test_l2net_e2_by_hand() -> None:
    assert l2net_e2(t(A3), t(P3), reduction="sum").item() == pytest.approx(E2_SUM, rel=1e-9)
    # Divided by N = 3 pairs, the factor E1 and E3 are divided by (not by D(D-1) = 2).
    assert l2net_e2(t(A3), t(P3)).item() == pytest.approx(E2_SUM / 3, rel=1e-9)
    assert l2net_e2(t(A3), t(P3)).item() != pytest.approx(E2_SUM / 2, rel=1e-3)


def test_l2net_e2_zero_for_uncorrelated_dimensions() -> None:
    # Two dimensions with zero covariance over the batch.
    a = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) / math.sqrt(2)
    assert l2net_e2(t(a), t(a)).item() == pytest.approx(0.0, abs=1e-12)


def test_l2net_e2_grows_with_correlation_at_the_papers_scale() -> None:
    # Dimension 1 = rho * dim 0 + sqrt(1 - rho^2) * (an orthogonal zero-mean column): the
    # correlation is exactly rho, so the paper's E2 = 1/2 (2 rho^2 + 2 rho^2) = 2 rho^2, and
    # the loss adds E2 / N on top of E1 / N.
    x = np.array([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    y = np.array([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    n = len(x)
    previous = -1.0
    for rho in (0.0, 0.3, 0.6, 0.9, 1.0):
        a = np.stack([x, rho * x + math.sqrt(1 - rho**2) * y], axis=1)
        a_t, p_t = t(a), t(a[::-1].copy())
        extra = (l2net_loss(a_t, p_t) - l2net_e1(a_t, p_t)).item()
        assert extra == pytest.approx(2 * rho**2 / n, abs=1e-9)
        assert extra > previous or rho == 0.0
        previous = extra


def np_l2net_e1_sum(a: np.ndarray, p: np.ndarray) -> float:
    d = np_dist(a, p)
    s = np.exp(2.0 - d)
    return float(
        -0.5
        * sum(
            math.log(s[i, i] / s[:, i].sum()) + math.log(s[i, i] / s[i, :].sum())
            for i in range(len(a))
        )
    )


def np_l2net_e2_sum(a: np.ndarray, p: np.ndarray) -> float:
    total = 0.0
    for y in (a, p):
        r = np.corrcoef(y.T)  # rows = dimensions
        total += sum(r[i, j] ** 2 for i in range(len(r)) for j in range(len(r)) if i != j)
    return 0.5 * total


def test_l2net_e2_to_e1_weight_is_the_papers() -> None:
    # At a realistic shape the E2 : E1 ratio of the loss is the ratio of the paper's sums.
    rng = np.random.default_rng(4)
    n, dim = 64, 16
    a = unit(rng.normal(size=(n, dim)))
    p = unit(a + 0.3 * rng.normal(size=(n, dim)))
    e1, e2 = np_l2net_e1_sum(a, p), np_l2net_e2_sum(a, p)
    total = l2net_loss(t(a), t(p)).item()
    assert total == pytest.approx((e1 + e2) / n, rel=1e-6)
    assert (total - l2net_e1(t(a), t(p)).item()) / l2net_e1(t(a), t(p)).item() == pytest.approx(
        e2 / e1, rel=1e-6
    )
    # The E2 form divided by D(D-1) is a named variant: D(D-1)/N = 240/64 times weaker.
    dim_mean = l2net_loss(t(a), t(p), e2="dim-mean").item()
    assert dim_mean == pytest.approx(e1 / n + e2 / (dim * (dim - 1)), rel=1e-6)
    assert l2net_loss(t(a), t(p), e2="none").item() == pytest.approx(e1 / n, rel=1e-6)


# E3 on maps of shape (C, H, W) = (1, 1, 2): anchors o0 = (1, 0), o1 = (0, 2); positives
# o'0 = (1, 1), o'1 = (0, 1). G = inner products: G00 = 1, G01 = 0, G10 = 2, G11 = 2.
FA = [[[[1.0, 0.0]]], [[[0.0, 2.0]]]]
FP = [[[[1.0, 1.0]]], [[[0.0, 1.0]]]]


def test_l2net_e3_by_hand() -> None:
    v_c00 = E(1) / (E(1) + E(2))  # column 0: e^G00 / (e^G00 + e^G10)
    v_c11 = E(2) / (E(0) + E(2))  # column 1: e^G11 / (e^G01 + e^G11)
    v_r00 = E(1) / (E(1) + E(0))  # row 0: e^G00 / (e^G00 + e^G01)
    v_r11 = E(2) / (E(2) + E(2))  # row 1: e^G11 / (e^G10 + e^G11)
    e3_sum = -0.5 * (LOG(v_c00) + LOG(v_c11) + LOG(v_r00) + LOG(v_r11))
    fa, fp = [t(FA)], [t(FP)]
    assert l2net_e3(fa, fp, reduction="sum").item() == pytest.approx(e3_sum, rel=1e-9)
    assert l2net_e3(fa, fp).item() == pytest.approx(e3_sum / 2, rel=1e-9)
    # Two supervised layers: their terms add.
    assert l2net_e3(fa * 2, fp * 2).item() == pytest.approx(e3_sum, rel=1e-9)
    # The cosine variant (maps scaled to unit length) is another value, and a named option.
    cos = l2net_e3(fa, fp, similarity="cosine").item()
    assert cos != pytest.approx(e3_sum / 2, rel=1e-3)
    c01, c10, c11 = 0.0, 1 / SQ(2), 1.0  # cosines: o0.o'1, o1.o'0, o1.o'1; o0.o'0 = 1/sqrt 2
    c00 = 1 / SQ(2)
    cos_sum = -0.5 * (
        LOG(E(c00) / (E(c00) + E(c10)))
        + LOG(E(c11) / (E(c01) + E(c11)))
        + LOG(E(c00) / (E(c00) + E(c01)))
        + LOG(E(c11) / (E(c10) + E(c11)))
    )
    assert cos == pytest.approx(cos_sum / 2, rel=1e-9)
    with pytest.raises(ConfigError, match="inner"):
        l2net_e3(fa, fp, similarity="dot")


def test_l2net_e3_falls_as_matching_maps_align() -> None:
    # Maps of equal norm; the positives move from unrelated maps to the anchors' own.
    g = torch.Generator().manual_seed(5)
    n, shape = 16, (4, 3, 3)
    fa = torch.nn.functional.normalize(torch.randn(n, 36, generator=g, dtype=torch.float64), dim=1)
    other = torch.nn.functional.normalize(
        torch.randn(n, 36, generator=g, dtype=torch.float64), dim=1
    )
    values = []
    for w in np.linspace(0.0, 1.0, 6):
        fp = torch.nn.functional.normalize((1 - w) * other + w * fa, dim=1)
        values.append(l2net_e3([3 * fa.view(n, *shape)], [3 * fp.view(n, *shape)]).item())
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), values


def test_l2net_loss_is_the_papers_sum_up_to_one_factor() -> None:
    rng = np.random.default_rng(2)
    for n in (3, 5):
        a, p = t(unit(rng.normal(size=(n, 3)))), t(unit(rng.normal(size=(n, 3))))
        fa, fp = [t(rng.normal(size=(n, 2, 2, 2)))], [t(rng.normal(size=(n, 2, 2, 2)))]
        paper = (
            l2net_e1(a, p, reduction="sum")
            + l2net_e2(a, p, reduction="sum")
            + l2net_e3(fa, fp, reduction="sum")
        )
        assert l2net_loss(a, p, fa, fp, reduction="sum").item() == pytest.approx(paper.item())
        assert l2net_loss(a, p, fa, fp).item() == pytest.approx(paper.item() / n)
    # By hand on the three pairs of the E2 example plus two E3 layers of the E3 maps shape.
    a, p = t(A3), t(P3)
    e1_sum = np_l2net_e1_sum(np.array(A3), np.array(P3))
    assert l2net_loss(a, p).item() == pytest.approx((e1_sum + E2_SUM) / 3, rel=1e-9)
    with pytest.raises(ValueError):
        l2net_loss(a, p, [t(FA)], None)
    with pytest.raises(ConfigError, match="paper"):
        l2net_loss(a, p, e2="half")
    with pytest.raises(ConfigError, match="mean"):
        l2net_loss(a, p, reduction="max")


# -- HardNet --------------------------------------------------------------------------------


def test_hardnet_by_hand_two_pairs() -> None:
    # Pair 0: nearest other positive to a0 is p1 (d01 = 1.2), nearest other anchor to p0 is
    # a1 (d10 = sqrt 0.4): d_neg = sqrt 0.4. Pair 1: row d10 = sqrt 0.4, column d01 = 1.2.
    term0 = max(0.0, 1.0 + D00 - min(D01, D10))
    term1 = max(0.0, 1.0 + D11 - min(D10, D01))
    assert hardnet_loss(t(A2), t(P2)).item() == pytest.approx((term0 + term1) / 2, rel=1e-6)
    # Without anchor swap only the rows count: pair 0 sees d01, pair 1 sees d10.
    no_swap = (max(0.0, 1.0 + D00 - D01) + max(0.0, 1.0 + D11 - D10)) / 2
    assert hardnet_loss(t(A2), t(P2), anchor_swap=False).item() == pytest.approx(no_swap, rel=1e-6)


def loop_hardnet(a: np.ndarray, p: np.ndarray, margin: float, swap: bool) -> float:
    """The paper's formula, term by term: for each i, the hardest negative over j != i."""
    n = len(a)
    total = 0.0
    for i in range(n):
        d_pos = math.dist(a[i], p[i])
        d_neg = math.inf
        for j in range(n):
            if j == i:
                continue
            d = math.dist(a[i], p[j])
            if d >= 0.008:  # near-duplicates are not negatives (the reference code's rule)
                d_neg = min(d_neg, d)
            if swap:
                d = math.dist(a[j], p[i])
                if d >= 0.008:
                    d_neg = min(d_neg, d)
        total += max(0.0, margin + d_pos - d_neg) if d_neg < math.inf else 0.0
    return total / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hardnet_against_a_loop_implementation(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = unit(rng.normal(size=(7, 4)))
    p = unit(a + 0.6 * rng.normal(size=(7, 4)))
    for swap in (True, False):
        for margin in (1.0, 0.5):
            got = hardnet_loss(t(a), t(p), margin=margin, anchor_swap=swap).item()
            assert got == pytest.approx(loop_hardnet(a, p, margin, swap), rel=1e-6)


def test_hardnet_anchor_swap_finds_harder_negative() -> None:
    # Positive 1 is much closer to anchor 0 than any positive is to an anchor in its row:
    # only the column minimum (anchor swap) sees it as the hardest negative of pair 1.
    a = angles(0.0, 180.0)
    p = angles(40.0, 10.0)
    with_swap = hardnet_loss(t(a), t(p), anchor_swap=True).item()
    without = hardnet_loss(t(a), t(p), anchor_swap=False).item()
    assert with_swap > without
    assert with_swap == pytest.approx(loop_hardnet(a, p, 1.0, True), rel=1e-6)
    assert without == pytest.approx(loop_hardnet(a, p, 1.0, False), rel=1e-6)


def test_hardnet_constant_negatives_same_value_gradient_only_through_positives() -> None:
    a_np, p_np = angles(0.0, 100.0, 230.0), angles(20.0, 70.0, 250.0)
    a0, p0 = t(a_np).requires_grad_(True), t(p_np).requires_grad_(True)
    loss = hardnet_loss(a0, p0, constant_negatives=True)
    assert loss.item() == pytest.approx(loop_hardnet(a_np, p_np, 1.0, True), rel=1e-6)
    loss.backward()
    # By hand: d(loss)/d(a_i) = [active_i] / N * (a_i - p_i) / d_pos[i], and the same with
    # the sign turned for p_i; the hardest negatives contribute nothing.
    d = np_dist(a_np, p_np)
    n = len(a_np)
    neg = [min(min(d[i, j], d[j, i]) for j in range(n) if j != i) for i in range(n)]
    active = np.array([1.0 + d[i, i] - neg[i] > 0 for i in range(n)], np.float64)
    g = active[:, None] / n * (a_np - p_np) / np.diag(d)[:, None]
    np.testing.assert_allclose(a0.grad.numpy(), g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p0.grad.numpy(), -g, rtol=1e-5, atol=1e-7)
    assert active.sum() > 0


def test_hardnet_ignores_duplicates() -> None:
    a = angles(0.0, 120.0, 240.0)
    p = angles(0.0, 120.0, 0.0)  # positive 2 duplicates positive 0
    got = hardnet_loss(t(a), t(p)).item()
    assert got == pytest.approx(loop_hardnet(a, p, 1.0, True), rel=1e-6)
    same = t(angles(0.0, 0.0, 0.0))  # no valid negative at all: zero, finite
    assert hardnet_loss(same, same).item() == 0.0


# -- SOSNet ---------------------------------------------------------------------------------


def loop_sosnet(a: np.ndarray, p: np.ndarray, margin: float, knn: int, w: float) -> float:
    n = len(a)
    fos = 0.0
    for i in range(n):
        negs = [
            math.dist(x[i], y[j])
            for j in range(n)
            if j != i
            for x, y in ((a, a), (a, p), (p, a), (p, p))
        ]
        fos += max(0.0, margin + math.dist(a[i], p[i]) - min(negs)) ** 2
    sosr = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        near = set(sorted(others, key=lambda j: math.dist(a[i], a[j]))[:knn])
        near |= set(sorted(others, key=lambda j: math.dist(p[i], p[j]))[:knn])
        sosr += math.sqrt(sum((math.dist(a[i], a[j]) - math.dist(p[i], p[j])) ** 2 for j in near))
    return fos / n + w * sosr / n


def test_sosnet_against_a_loop_implementation() -> None:
    a = angles(0.0, 75.0, 160.0, 250.0, 300.0)
    p = angles(15.0, 95.0, 150.0, 230.0, 320.0)
    for knn, w in ((1, 1.0), (2, 0.5), (8, 1.0)):
        got = sosnet_loss(t(a), t(p), margin=1.0, knn=knn, sos_weight=w).item()
        assert got == pytest.approx(loop_sosnet(a, p, 1.0, knn, w), rel=1e-6)


def test_sosnet_by_hand_two_pairs() -> None:
    # FOS: pair 0's negatives |a0-a1| = sqrt 2, |a0-p1| = 1.2, |p0-a1| = sqrt 0.4,
    # |p0-p1| = sqrt 0.128; pair 1's are the same four distances. d_neg = sqrt 0.128 for both.
    fos = (max(0.0, 1 + D00 - SQ(0.128)) ** 2 + max(0.0, 1 + D11 - SQ(0.128)) ** 2) / 2
    # SOSR (k = 1, the only other point): |a0-a1| - |p0-p1| = sqrt 2 - sqrt 0.128, both rows.
    sosr = abs(SQ(2) - SQ(0.128))
    got = sosnet_loss(t(A2), t(P2), knn=1).item()
    assert got == pytest.approx(fos + sosr, rel=1e-6)


def test_sosnet_sosr_is_zero_for_isometric_batches() -> None:
    # Positives = anchors under a rotation: every distance within the positives equals the
    # same distance within the anchors, so SOSR vanishes and the loss is FOS alone.
    rng = np.random.default_rng(6)
    a = unit(rng.normal(size=(12, 5)))
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    p = a @ q
    with_sos = sosnet_loss(t(a), t(p)).item()
    without = sosnet_loss(t(a), t(p), sos_weight=0.0).item()
    assert with_sos == pytest.approx(without, abs=1e-6)
    # ...and not for a batch whose second-order structure differs.
    p2 = unit(a + 0.5 * rng.normal(size=a.shape))
    assert sosnet_loss(t(a), t(p2)).item() > sosnet_loss(t(a), t(p2), sos_weight=0.0).item() + 0.1


# -- baselines ------------------------------------------------------------------------------


def test_contrastive_by_hand_both_forms() -> None:
    # N = 2: the only shift is 1, the negative of anchor i is the other positive.
    m = 1.5
    pos = (D00**2 + D11**2) / 2
    squared = 0.5 * (pos + (max(0.0, m - D01**2) + max(0.0, m - D10**2)) / 2)
    hadsell = 0.5 * (pos + (max(0.0, m - D01) ** 2 + max(0.0, m - D10) ** 2) / 2)
    assert contrastive_loss(t(A2), t(P2), margin=m).item() == pytest.approx(squared, rel=1e-6)
    got = contrastive_loss(t(A2), t(P2), margin=m, form="hadsell").item()
    assert got == pytest.approx(hadsell, rel=1e-6)
    assert squared != pytest.approx(hadsell, rel=1e-3)
    with pytest.raises(ConfigError, match="hadsell"):
        contrastive_loss(t(A2), t(P2), form="hinge")


def test_contrastive_is_deterministic_with_a_generator() -> None:
    rng = np.random.default_rng(3)
    a, p = t(unit(rng.normal(size=(6, 4)))), t(unit(rng.normal(size=(6, 4))))
    values = {
        contrastive_loss(a, p, generator=torch.Generator().manual_seed(s)).item() for s in (7, 7, 7)
    }
    assert len(values) == 1
    # Every value is one of the N-1 shifts.
    d = np_dist(a.numpy(), p.numpy())
    pos = np.mean(np.diag(d) ** 2)
    candidates = [
        0.5 * (pos + np.mean([max(0.0, 1 - d[i, (i - s) % 6] ** 2) for i in range(6)]))
        for s in range(1, 6)
    ]
    for seed in range(10):
        v = contrastive_loss(a, p, generator=torch.Generator().manual_seed(seed)).item()
        assert min(abs(v - c) for c in candidates) < 1e-9


def test_triplet_random_by_hand_both_forms() -> None:
    # N = 2: the negative of anchor i is the other positive.
    squared = (max(0.0, 1 + D00**2 - D01**2) + max(0.0, 1 + D11**2 - D10**2)) / 2
    distance = (max(0.0, 1 + D00 - D01) + max(0.0, 1 + D11 - D10)) / 2
    g = torch.Generator().manual_seed(0)
    assert triplet_loss(t(A2), t(P2), generator=g).item() == pytest.approx(squared, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    got = triplet_loss(t(A2), t(P2), generator=g, form="distance").item()
    assert got == pytest.approx(distance, rel=1e-6)
    assert squared != pytest.approx(distance, rel=1e-3)


@pytest.mark.parametrize("form", ["squared", "distance"])
def test_triplet_semihard_by_hand(form: str) -> None:
    a = angles(0.0, 60.0, 110.0, 300.0, 250.0)
    p = angles(170.0, 65.0, 100.0, 290.0, 200.0)
    n = len(a)
    d = np_dist(a, p)
    if form == "squared":
        d = d**2  # squared distances order the candidates the same way
    semi_total = hard_total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        farther = [j for j in others if d[i, j] > d[i, i]]
        hardest = min(others, key=lambda j: d[i, j])
        j = min(farther, key=lambda j: d[i, j]) if farther else hardest
        semi_total += max(0.0, 1.0 + d[i, i] - d[i, j])
        hard_total += max(0.0, 1.0 + d[i, i] - d[i, hardest])
    assert all(d[0, j] < d[0, 0] for j in range(1, n))  # pair 0: no farther negative
    assert d[4, 3] < d[4, 4] < d[4, 0]  # pair 4: semi-hard picks p0 over the hardest p3
    got = triplet_loss(t(a), t(p), mining="semihard", form=form).item()
    assert got == pytest.approx(semi_total / n, rel=1e-6)
    assert got != pytest.approx(hard_total / n, rel=1e-3)
    with pytest.raises(ConfigError):
        triplet_loss(t(a), t(p), mining="hardest-ever")


# -- all losses -----------------------------------------------------------------------------


def _batch(n: int = 16, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    p = torch.nn.functional.normalize(a + 0.1 * torch.randn(n, dim, generator=g), dim=1)
    return a, p


def _call(name: str, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    if name in ("contrastive", "triplet"):
        return LOSSES[name](a, p, generator=torch.Generator().manual_seed(0))
    return LOSSES[name](a, p)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_flow(name: str) -> None:
    a0, p0 = _batch()
    a = a0.clone().requires_grad_()
    p = p0[torch.randperm(16, generator=torch.Generator().manual_seed(1))].clone()
    p.requires_grad_()
    loss = _call(name, a, p)
    assert loss.dim() == 0
    loss.backward()
    for x in (a, p):
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_l2net_e3_gradients_flow() -> None:
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    fp = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    l2net_e3([fa], [fp]).backward()
    assert fa.grad.abs().sum() > 0 and fp.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_matching_descriptors_beat_shuffled_ones(name: str) -> None:
    a, p = _batch()
    shuffled = p[torch.roll(torch.arange(16), 5)]
    assert _call(name, a, p).item() < _call(name, a, shuffled).item()


@pytest.mark.parametrize("name", ["l2net", "hardnet", "sosnet", "triplet"])
def test_identical_pairs_are_stable(name: str) -> None:
    a, _ = _batch()
    x = a.clone().requires_grad_()
    loss = _call(name, x, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_registry_and_named_variants() -> None:
    assert set(LOSSES) == {"l2net", "hardnet", "sosnet", "contrastive", "triplet"}
    assert set(LOSS_VARIANTS) == set(LOSSES)
    assert get_loss("hardnet") is hardnet_loss
    with pytest.raises(ConfigError, match="valid"):
        get_loss("nope")
    # The default of every named variant is its first choice.
    for name, variants in LOSS_VARIANTS.items():
        import inspect

        params = inspect.signature(LOSSES[name]).parameters
        for option, choices in variants.items():
            assert params[option].default == choices[0], (name, option)
    assert check_loss_options("contrastive", {"form": "hadsell", "margin": 0.5}) == {
        "form": "hadsell",
        "margin": 0.5,
    }
    with pytest.raises(ConfigError, match="squared"):
        check_loss_options("triplet", {"form": "cubed"})
    with pytest.raises(ConfigError, match="margin"):
        check_loss_options("hardnet", {"knn": 3})


def test_shape_errors() -> None:
    a, p = _batch(4, 3)
    with pytest.raises(ValueError):
        hardnet_loss(a, p[:3])
    with pytest.raises(ValueError):
        sosnet_loss(a[:1], p[:1])
    with pytest.raises(ValueError):
        l2net_e1(a.unsqueeze(0), p.unsqueeze(0))
