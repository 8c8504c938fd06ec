"""FPR at 95 % recall (Brown protocol), hand-checked, and end to end on a synthetic dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_brown import make_brown_fixture
from torch import nn

from descmatch.errors import ConfigError
from descmatch.train.brown import BrownDataset
from descmatch.train.evaluation import describe_patches, evaluate_fpr95, fpr_at_recall

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- fpr_at_recall


def test_small_hand_computed() -> None:
    # sorted: 0.1 T, 0.2 F, 0.3 T, 0.4 T, 0.5 F, 0.6 F   (3 positives, 3 negatives)
    d = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    m = np.array([1, 0, 1, 1, 0, 0], dtype=bool)
    # 95 % of 3 positives -> all 3 -> threshold 0.4 accepts one negative (0.2)
    assert fpr_at_recall(d, m) == pytest.approx(1 / 3)
    assert fpr_at_recall(d, m, recall=1.0) == pytest.approx(1 / 3)
    # 50 % -> 2 positives -> threshold 0.3, still one negative
    assert fpr_at_recall(d, m, recall=0.5) == pytest.approx(1 / 3)
    # 30 % -> 1 positive -> threshold 0.1, no negative
    assert fpr_at_recall(d, m, recall=0.3) == 0.0


def test_twenty_positives() -> None:
    # positives at distances 1..20; 95 % of 20 = 19 -> threshold 19
    pos = np.arange(1.0, 21.0)
    neg = np.array([0.5, 10.5, 18.5, 19.5, 20.5, 30.0])
    d = np.concatenate([pos, neg])
    m = np.concatenate([np.ones(20, bool), np.zeros(6, bool)])
    # negatives <= 19: 0.5, 10.5, 18.5 -> 3 / 6
    assert fpr_at_recall(d, m) == pytest.approx(0.5)
    # all 20 -> threshold 20 -> 4 / 6
    assert fpr_at_recall(d, m, recall=1.0) == pytest.approx(4 / 6)
    # 90 % of 20 = 18 -> threshold 18 -> 2 / 6
    assert fpr_at_recall(d, m, recall=0.9) == pytest.approx(2 / 6)
    # order of the input does not matter
    perm = np.random.default_rng(0).permutation(len(d))
    assert fpr_at_recall(d[perm], m[perm]) == pytest.approx(0.5)


def test_hundred_positives_exact_target() -> None:
    # 0.95 * 100 must mean 95 positives, not 96 through floating-point noise
    pos = np.arange(1.0, 101.0)  # the 95th positive is at distance 95
    neg = np.array([94.5, 95.5])
    d = np.concatenate([pos, neg])
    m = np.concatenate([np.ones(100, bool), np.zeros(2, bool)])
    assert fpr_at_recall(d, m) == pytest.approx(0.5)  # 94.5 accepted, 95.5 not
    d[100:] = [95.25, 95.5]
    assert fpr_at_recall(d, m) == 0.0  # threshold 95: neither negative


def test_ties_are_accepted_together() -> None:
    # one positive ties with two negatives at the threshold: all three are accepted
    d = np.array([1.0, 1.0, 1.0, 2.0])
    m = np.array([True, False, False, True])
    assert fpr_at_recall(d, m, recall=0.5) == pytest.approx(1.0)
    # the same whatever the order inside the tie
    assert fpr_at_recall(d[::-1].copy(), m[::-1].copy(), recall=0.5) == pytest.approx(1.0)
    d = np.array([0.3, 0.2, 0.2, 0.1])
    m = np.array([False, False, True, True])
    assert fpr_at_recall(d, m) == pytest.approx(0.5)
    assert fpr_at_recall(d[[1, 2, 0, 3]], m[[1, 2, 0, 3]]) == pytest.approx(0.5)


def test_ties_do_not_leak_past_threshold() -> None:
    # a negative tied with a positive *below* the threshold counts; one just above does not
    d = np.array([0.1, 0.1, 0.2, 0.2000001, 0.9])
    m = np.array([True, False, True, False, False])
    assert fpr_at_recall(d, m, recall=1.0) == pytest.approx(1 / 3)


def test_perfect_separation_is_zero() -> None:
    rng = np.random.default_rng(1)
    d = np.concatenate([rng.uniform(0, 1, 50), rng.uniform(1.5, 2, 70)])
    m = np.concatenate([np.ones(50, bool), np.zeros(70, bool)])
    assert fpr_at_recall(d, m) == 0.0
    assert fpr_at_recall(d, m, recall=1.0) == 0.0
    # fully inverted: every negative comes first
    assert fpr_at_recall(-d, m) == 1.0


def test_int_labels_and_lists() -> None:
    assert fpr_at_recall([0.1, 0.2, 0.3], [1, 0, 1], recall=1.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("d", "m", "recall", "msg"),
    [
        ([0.1, 0.2], [False, False], 0.95, "no matching"),
        ([0.1, 0.2], [True, True], 0.95, "no non-matching"),
        ([0.1, 0.2], [True], 0.95, "differ"),
        ([0.1, 0.2], [True, False], 0.0, "recall"),
        ([0.1, 0.2], [True, False], 1.5, "recall"),
        ([0.1, float("nan")], [True, False], 0.95, "NaN"),
        ([], [], 0.95, "no matching"),
    ],
)
def test_errors(d: list, m: list, recall: float, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        fpr_at_recall(np.array(d, dtype=float), np.array(m, dtype=bool), recall)


# --------------------------------------------------------------------------- end to end


class PooledPixels(nn.Module):
    """A hand-made descriptor: 8x8 average-pooled pixels, mean removed, L2-normalised."""

    patch_size = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(x, 8).flatten(1)
        return F.normalize(y - y.mean(dim=1, keepdim=True), dim=1)


class RandomDescriptor(nn.Module):
    """Ignores its input: random unit vectors, seeded."""

    def __init__(self) -> None:
        super().__init__()
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(torch.randn(len(x), 64, generator=self.gen), dim=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> BrownDataset:
    return BrownDataset(make_brown_fixture(tmp_path_factory.mktemp("brown") / "synthetic"))


def test_evaluate_separates_good_from_random(dataset: BrownDataset) -> None:
    good = evaluate_fpr95(PooledPixels(), dataset, CPU, batch_size=50)
    bad = evaluate_fpr95(RandomDescriptor(), dataset, CPU, batch_size=50)
    assert set(good) == {"fpr95", "num_pairs", "num_matches"}
    assert good["num_pairs"] == 240 and good["num_matches"] == 120
    assert good["fpr95"] < 0.5
    assert bad["fpr95"] > 0.5
    assert bad["fpr95"] > good["fpr95"] + 0.3


def test_evaluate_matches_direct_computation(dataset: BrownDataset) -> None:
    net = PooledPixels()
    idx0, idx1, is_match = dataset.pairs()
    desc = describe_patches(net, dataset.patches, CPU)
    dist = np.linalg.norm(desc[idx0] - desc[idx1], axis=1)
    got = evaluate_fpr95(net, dataset, CPU, batch_size=7)
    assert got["fpr95"] == pytest.approx(fpr_at_recall(dist, is_match))


def test_evaluate_named_pairs(dataset: BrownDataset) -> None:
    name = dataset.pair_files()[0]
    a = evaluate_fpr95(PooledPixels(), dataset, CPU, pairs_name=name)
    b = evaluate_fpr95(PooledPixels(), dataset, CPU)
    assert a == b


def test_describe_patches_shapes_and_scaling() -> None:
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x.flatten(1)[:, :5].double()

    patches = np.arange(10 * 4 * 4, dtype=np.int64).reshape(10, 4, 4).astype(np.uint8)
    patches[0, 0, 0] = 255
    out = describe_patches(Spy(), patches, CPU, batch_size=4)
    assert out.shape == (10, 5) and out.dtype == np.float32
    assert [tuple(s.shape) for s in seen] == [(4, 1, 4, 4), (4, 1, 4, 4), (2, 1, 4, 4)]
    assert all(s.dtype == torch.float32 for s in seen)
    np.testing.assert_allclose(out, patches.reshape(10, -1)[:, :5] / 255.0, rtol=1e-6)
    assert out[0, 0] == 1.0


def test_describe_patches_real_net_restores_mode() -> None:
    from descmatch.nets import build_net

    net = build_net("hardnet")
    net.train()
    patches = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32), dtype=np.uint8)
    out = describe_patches(net, patches, CPU, batch_size=2)
    assert out.shape == (5, 128)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert net.training
    # eval mode: batching does not change the result
    np.testing.assert_allclose(describe_patches(net, patches, CPU, batch_size=5), out, atol=1e-5)
    with pytest.raises(ConfigError, match="32"):
        describe_patches(net, np.zeros((2, 64, 64), np.uint8), CPU)


def test_describe_patches_empty() -> None:
    out = describe_patches(PooledPixels(), np.zeros((0, 32, 32), np.uint8), CPU)
    assert out.shape[0] == 0 and out.dtype == np.float32


def test_evaluate_patch_size_mismatch(tmp_path: Path) -> None:
    # a 64-px dataset with a 32-px net is a clear configuration error
    ds = BrownDataset(make_brown_fixture(tmp_path / "d", n_points=4, per_point=2), patch_size=64)
    with pytest.raises(ConfigError, match="64"):
        evaluate_fpr95(PooledPixels(), ds, CPU)
