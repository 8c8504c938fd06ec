"""Training losses against values written out by hand in numpy, gradients, and the registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from descmatch.errors import ConfigError
from descmatch.train.losses import (
    LOSSES,
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


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def t(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


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


A3 = angles(0.0, 100.0, 230.0)
P3 = angles(20.0, 70.0, 250.0)


def test_distance_matrix_matches_numpy_and_is_safe() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    b = np.array([[0.0, 1.0], [1.0, 0.0]])
    d = distance_matrix(t(a), t(b))
    assert d.shape == (3, 2)
    np.testing.assert_allclose(
        d.numpy(),
        [[math.sqrt(2), 0], [0, math.sqrt(2)], [math.sqrt(0.36 + 0.04), math.sqrt(0.16 + 0.64)]],
        atol=1e-4,
    )
    x = t(a).requires_grad_()
    distance_matrix(x, x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_l2net_e1_by_hand() -> None:
    d = np_dist(A3, P3)
    s = np.exp(2.0 - d)
    s_col = s / s.sum(axis=0, keepdims=True)
    s_row = s / s.sum(axis=1, keepdims=True)
    expected = -0.5 * (np.mean(np.log(np.diag(s_col))) + np.mean(np.log(np.diag(s_row))))
    assert l2net_e1(t(A3), t(P3)).item() == pytest.approx(expected, rel=1e-6)


def test_l2net_e2_by_hand() -> None:
    rng = np.random.default_rng(0)
    a = unit(rng.normal(size=(5, 3)))
    p = unit(rng.normal(size=(5, 3)))

    def off_diag_sq(x: np.ndarray) -> float:
        r = np.corrcoef(x.T)  # rows = dimensions
        return float(sum(r[i, j] ** 2 for i in range(3) for j in range(3) if i != j))

    expected = 0.5 * (off_diag_sq(a) + off_diag_sq(p))
    assert l2net_e2(t(a), t(p), mean=False).item() == pytest.approx(expected, rel=1e-6)
    assert l2net_e2(t(a), t(p)).item() == pytest.approx(expected / 6, rel=1e-6)  # 3 x 2 pairs


def test_l2net_e2_zero_for_uncorrelated_dimensions() -> None:
    # Two dimensions with zero covariance over the batch.
    a = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) / math.sqrt(2)
    assert l2net_e2(t(a), t(a)).item() == pytest.approx(0.0, abs=1e-12)


def test_l2net_e3_by_hand() -> None:
    rng = np.random.default_rng(1)
    maps_a = [rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 1, 3, 3))]
    maps_p = [rng.normal(size=(3, 2, 2, 2)), rng.normal(size=(3, 1, 3, 3))]
    expected = 0.0
    for fa, fp in zip(maps_a, maps_p, strict=True):
        va = unit(fa.reshape(3, -1))
        vp = unit(fp.reshape(3, -1))
        s = np.exp(va @ vp.T)
        col = np.diag(s / s.sum(axis=0, keepdims=True))
        row = np.diag(s / s.sum(axis=1, keepdims=True))
        expected += -0.5 * (np.log(col).mean() + np.log(row).mean())
    got = l2net_e3([t(m) for m in maps_a], [t(m) for m in maps_p])
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_l2net_loss_is_the_sum() -> None:
    rng = np.random.default_rng(2)
    a, p = t(unit(rng.normal(size=(4, 3)))), t(unit(rng.normal(size=(4, 3))))
    fa, fp = [t(rng.normal(size=(4, 2, 2, 2)))], [t(rng.normal(size=(4, 2, 2, 2)))]
    base = l2net_e1(a, p) + l2net_e2(a, p)
    assert l2net_loss(a, p).item() == pytest.approx(base.item())
    assert l2net_loss(a, p, fa, fp).item() == pytest.approx((base + l2net_e3(fa, fp)).item())
    with pytest.raises(ValueError):
        l2net_loss(a, p, fa, None)


def np_hardnet(a: np.ndarray, p: np.ndarray, margin: float, swap: bool) -> float:
    d = np_dist(a, p)
    n = len(a)
    total = 0.0
    for i in range(n):
        cands = [d[i, j] for j in range(n) if j != i and d[i, j] >= 0.008]
        if swap:
            cands += [d[j, i] for j in range(n) if j != i and d[j, i] >= 0.008]
        total += max(0.0, margin + d[i, i] - min(cands))
    return total / n


def test_hardnet_by_hand_with_and_without_anchor_swap() -> None:
    for swap in (True, False):
        got = hardnet_loss(t(A3), t(P3), margin=1.0, anchor_swap=swap).item()
        assert got == pytest.approx(np_hardnet(A3, P3, 1.0, swap), rel=1e-6)


def test_hardnet_anchor_swap_finds_harder_negative() -> None:
    # Positive 1 is much closer to anchor 0 than any positive is to an anchor in its row:
    # only the column minimum (anchor swap) sees it as the hardest negative of pair 1.
    a = angles(0.0, 180.0)
    p = angles(40.0, 10.0)
    with_swap = hardnet_loss(t(a), t(p), anchor_swap=True).item()
    without = hardnet_loss(t(a), t(p), anchor_swap=False).item()
    assert with_swap > without
    assert with_swap == pytest.approx(np_hardnet(a, p, 1.0, True), rel=1e-6)
    assert without == pytest.approx(np_hardnet(a, p, 1.0, False), rel=1e-6)


def test_hardnet_constant_negatives_same_value_gradient_only_through_positives() -> None:
    a0, p0 = t(A3).requires_grad_(True), t(P3).requires_grad_(True)
    loss = hardnet_loss(a0, p0, constant_negatives=True)
    assert loss.item() == pytest.approx(np_hardnet(A3, P3, 1.0, True), rel=1e-6)
    loss.backward()
    # By hand: d(loss)/d(a_i) = [active_i] / N * (a_i - p_i) / d_pos[i], and the same with
    # the sign turned for p_i; the hardest negatives contribute nothing.
    d = np_dist(A3, P3)
    n = len(A3)
    neg = [min(min(d[i, j], d[j, i]) for j in range(n) if j != i) for i in range(n)]
    active = np.array([1.0 + d[i, i] - neg[i] > 0 for i in range(n)], np.float64)
    g = active[:, None] / n * (A3 - P3) / np.diag(d)[:, None]
    np.testing.assert_allclose(a0.grad.numpy(), g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p0.grad.numpy(), -g, rtol=1e-5, atol=1e-7)
    assert active.sum() > 0


def test_hardnet_ignores_duplicates() -> None:
    # Positive 2 duplicates positive 0: distance(a0, p2) ~ distance(a0, p0) would otherwise be
    # the hardest negative of pair 0; a near-zero one is masked.
    a = angles(0.0, 120.0, 240.0)
    p = angles(0.0, 120.0, 0.0)
    got = hardnet_loss(t(a), t(p)).item()
    assert got == pytest.approx(np_hardnet(a, p, 1.0, True), rel=1e-6)
    assert math.isfinite(got)
    # A batch of identical pairs has no valid negative at all: zero, finite.
    same = t(angles(0.0, 0.0, 0.0))
    assert hardnet_loss(same, same).item() == 0.0


def np_sosnet(a: np.ndarray, p: np.ndarray, margin: float, knn: int, w: float) -> float:
    n = len(a)
    dap, daa, dpp = np_dist(a, p), np_dist(a, a), np_dist(p, p)
    fos = 0.0
    for i in range(n):
        negs = [m[i, j] for m in (daa, dap, dpp) for j in range(n) if j != i]
        negs += [dap[j, i] for j in range(n) if j != i]
        fos += max(0.0, margin + dap[i, i] - min(negs)) ** 2
    fos /= n
    sosr = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        near_a = sorted(others, key=lambda j: daa[i, j])[:knn]
        near_p = sorted(others, key=lambda j: dpp[i, j])[:knn]
        sosr += math.sqrt(sum((daa[i, j] - dpp[i, j]) ** 2 for j in set(near_a) | set(near_p)))
    return fos + w * sosr / n


def test_sosnet_by_hand() -> None:
    a = angles(0.0, 75.0, 160.0, 250.0, 300.0)
    p = angles(15.0, 95.0, 150.0, 230.0, 320.0)
    for knn, w in ((1, 1.0), (2, 0.5), (8, 1.0)):
        got = sosnet_loss(t(a), t(p), margin=1.0, knn=knn, sos_weight=w).item()
        assert got == pytest.approx(np_sosnet(a, p, 1.0, knn, w), rel=1e-6)
    fos_only = sosnet_loss(t(a), t(p), sos_weight=0.0).item()
    assert fos_only == pytest.approx(np_sosnet(a, p, 1.0, 1, 0.0), rel=1e-6)


def test_contrastive_by_hand() -> None:
    a = angles(0.0, 90.0)
    p = angles(30.0, 150.0)
    # N=2: the only shift is 1, the negative of anchor i is the other positive.
    d = np_dist(a, p)
    expected = 0.5 * (
        (d[0, 0] ** 2 + d[1, 1] ** 2) / 2
        + (max(0.0, 1.5 - d[0, 1]) ** 2 + max(0.0, 1.5 - d[1, 0]) ** 2) / 2
    )
    assert contrastive_loss(t(a), t(p), margin=1.5).item() == pytest.approx(expected, rel=1e-6)


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
        0.5 * (pos + np.mean([max(0.0, 1 - d[i, (i - s) % 6]) ** 2 for i in range(6)]))
        for s in range(1, 6)
    ]
    for seed in range(10):
        v = contrastive_loss(a, p, generator=torch.Generator().manual_seed(seed)).item()
        assert min(abs(v - c) for c in candidates) < 1e-9


def test_triplet_random_by_hand() -> None:
    a = angles(0.0, 90.0)
    p = angles(30.0, 150.0)
    d = np_dist(a, p)
    expected = (max(0.0, 1 + d[0, 0] - d[0, 1]) + max(0.0, 1 + d[1, 1] - d[1, 0])) / 2
    got = triplet_loss(t(a), t(p), mining="random", generator=torch.Generator().manual_seed(0))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_triplet_semihard_by_hand() -> None:
    a = angles(0.0, 60.0, 110.0, 300.0, 250.0)
    p = angles(170.0, 65.0, 100.0, 290.0, 200.0)
    n = len(a)
    d = np_dist(a, p)
    semi_total = hard_total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        farther = [j for j in others if d[i, j] > d[i, i]]
        hardest = min(others, key=lambda j: d[i, j])
        j = min(farther, key=lambda j: d[i, j]) if farther else hardest
        semi_total += max(0.0, 1.0 + d[i, i] - d[i, j])
        hard_total += max(0.0, 1.0 + d[i, i] - d[i, hardest])
    # Pair 0 has no negative farther than its positive: the hardest one is used.
    assert all(d[0, j] < d[0, 0] for j in range(1, n))
    # Pair 4's hardest negative (p3) is closer than its positive: semi-hard picks p0 instead.
    assert d[4, 3] < d[4, 4] < d[4, 0]
    got = triplet_loss(t(a), t(p), mining="semihard").item()
    assert got == pytest.approx(semi_total / n, rel=1e-6)
    assert got != pytest.approx(hard_total / n, rel=1e-3)
    with pytest.raises(ConfigError):
        triplet_loss(t(a), t(p), mining="hardest-ever")


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
    # a == p exactly: coincident vectors must not give NaN values or gradients.
    a, _ = _batch()
    x = a.clone().requires_grad_()
    loss = _call(name, x, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_registry() -> None:
    assert set(LOSSES) == {"l2net", "hardnet", "sosnet", "contrastive", "triplet"}
    assert get_loss("hardnet") is hardnet_loss
    with pytest.raises(ConfigError, match="valid"):
        get_loss("nope")


def test_shape_errors() -> None:
    a, p = _batch(4, 3)
    with pytest.raises(ValueError):
        hardnet_loss(a, p[:3])
    with pytest.raises(ValueError):
        sosnet_loss(a[:1], p[:1])
    with pytest.raises(ValueError):
        l2net_e1(a.unsqueeze(0), p.unsqueeze(0))
