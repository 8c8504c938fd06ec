"""Pair samplers: distinct points per batch, same-point pairs, determinism, composition."""

from __future__ import annotations

import numpy as np
import pytest

from descmatch.train.samplers import HardNegativeSampler, HardNetSampler, ProgressiveSampler


def make_point_ids(num_points: int = 60, seed: int = 0) -> np.ndarray:
    """Shuffled patch -> point ids, 1 to 5 patches per point (so some points are unusable)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, size=num_points)
    ids = np.repeat(np.arange(num_points) * 7 + 3, counts)  # ids need not be 0..P-1
    return ids[rng.permutation(ids.size)]


def usable_ids(ids: np.ndarray) -> set[int]:
    values, counts = np.unique(ids, return_counts=True)
    return set(values[counts >= 2].tolist())


def check_batch(batch: np.ndarray, ids: np.ndarray, size: int) -> None:
    assert batch.dtype == np.int64 and batch.shape == (size, 2)
    assert np.all(batch[:, 0] != batch[:, 1])
    assert np.all(ids[batch[:, 0]] == ids[batch[:, 1]])
    assert len(set(ids[batch[:, 0]].tolist())) == size
    assert set(ids[batch[:, 0]].tolist()) <= usable_ids(ids)


def test_hardnet_sampler_batches() -> None:
    ids = make_point_ids()
    sampler = HardNetSampler(ids, batch_size=16, num_batches=30, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches) == 30
    for b in batches:
        check_batch(b, ids, 16)
    seen = set(np.concatenate([ids[b[:, 0]] for b in batches]).tolist())
    assert seen == usable_ids(ids)  # 480 draws over < 60 points reach all of them
    assert sampler.num_points == len(usable_ids(ids))


def test_hardnet_sampler_draws_both_orders_and_all_patches() -> None:
    ids = np.array([5, 5, 5, 9, 9])
    sampler = HardNetSampler(ids, batch_size=2, num_batches=200, seed=0)
    rows = {tuple(r) for b in sampler for r in b.tolist()}
    assert rows == {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1), (3, 4), (4, 3)}


def test_samplers_are_deterministic() -> None:
    ids = make_point_ids()
    for make in (
        lambda s: HardNetSampler(ids, 8, 5, seed=s),
        lambda s: ProgressiveSampler(ids, 8, 5, seed=s),
    ):
        one, again, other = make(3), make(3), make(4)
        first = [b.copy() for b in one]
        assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
        assert all(np.array_equal(x, y) for x, y in zip(first, one, strict=True))  # re-iterable
        assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))
        one.set_epoch(1)
        assert not all(np.array_equal(x, y) for x, y in zip(first, one, strict=True))


def test_progressive_sampler_composition() -> None:
    ids = make_point_ids(80)
    n = len(usable_ids(ids))
    sampler = ProgressiveSampler(ids, batch_size=10, p1_fraction=0.3, seed=2)
    assert (sampler.p1, sampler.p2) == (3, 7)
    assert len(sampler) == -(-n // 3)  # one pass over the sequence by default
    batches = list(sampler)
    for b in batches:
        check_batch(b, ids, 10)
    sequential = np.concatenate([ids[b[:3, 0]] for b in batches])
    # The p1 parts walk the shuffled sequence: every usable point once, then a wrap-around.
    assert set(sequential[:n].tolist()) == usable_ids(ids)
    assert len(set(sequential[:n].tolist())) == n
    np.testing.assert_array_equal(sequential[n:], sequential[: sequential.size - n])
    # The p2 parts are random: they differ from the next batches' sequential points.
    random_part = ids[batches[0][3:, 0]]
    assert not np.array_equal(random_part, sequential[3:10])


def test_progressive_sampler_defaults_and_errors() -> None:
    ids = make_point_ids()
    sampler = ProgressiveSampler(ids, batch_size=8, num_batches=4)
    assert (sampler.p1, sampler.p2, len(sampler)) == (4, 4, 4)
    full = ProgressiveSampler(ids, batch_size=8, num_batches=2, p1_fraction=1.0)
    assert full.p2 == 0
    for b in full:
        check_batch(b, ids, 8)
    with pytest.raises(ValueError):
        ProgressiveSampler(ids, batch_size=8, p1_fraction=0.0)
    with pytest.raises(ValueError):
        HardNetSampler(ids, batch_size=10_000, num_batches=1)
    with pytest.raises(ValueError):
        HardNetSampler(ids.reshape(-1, 1), batch_size=2, num_batches=1)


def clustered_dataset(seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """5 clusters of 4 points along orthogonal axes; 2-3 patches per point, shuffled."""
    rng = np.random.default_rng(seed)
    num_clusters, per_cluster, dim = 5, 4, 8
    point_desc, cluster_of = [], {}
    for c in range(num_clusters):
        for k in range(per_cluster):
            v = np.zeros(dim)
            v[c] = 1.0
            v[5 + k % 3] = 0.05 * (k + 1)  # distinct points, close within a cluster
            point_desc.append(v / np.linalg.norm(v))
            cluster_of[100 + len(cluster_of)] = c
    counts = rng.integers(2, 4, size=len(point_desc))
    ids = np.repeat(np.array(list(cluster_of)), counts)
    desc = np.repeat(np.array(point_desc), counts, axis=0)
    desc = desc + 0.001 * rng.normal(size=desc.shape)
    # One single-patch point far from everything: unusable, must never appear.
    ids = np.append(ids, 999)
    desc = np.vstack([desc, np.full((1, dim), 0.3)])
    perm = rng.permutation(ids.size)
    return ids[perm], desc[perm].astype(np.float32), cluster_of


def test_hard_negative_sampler_groups_nearest_points() -> None:
    ids, desc, cluster_of = clustered_dataset()
    sampler = HardNegativeSampler(
        ids, desc, batch_size=8, num_batches=12, group_size=4, seed=0, chunk_size=3
    )
    for b in sampler:
        check_batch(b, ids, 8)
        clusters = [cluster_of[int(i)] for i in ids[b[:, 0]]]
        # Each group of 4 = a seed and its 3 nearest unused points = one whole cluster.
        assert len(set(clusters[:4])) == 1 and len(set(clusters[4:])) == 1
        assert clusters[0] != clusters[4]


def test_hard_negative_sampler_single_group_and_refresh() -> None:
    ids, desc, cluster_of = clustered_dataset(1)
    sampler = HardNegativeSampler(ids, desc, batch_size=4, num_batches=6, seed=5, chunk_size=7)
    assert sampler.group_size == 4
    first = [b.copy() for b in sampler]
    for b in first:
        check_batch(b, ids, 4)
        assert len({cluster_of[int(i)] for i in ids[b[:, 0]]}) == 1
    # New descriptors that spread every point apart from its cluster mates change the groups.
    rng = np.random.default_rng(0)
    sampler.update_descriptors(rng.normal(size=desc.shape).astype(np.float32))
    assert not all(np.array_equal(x, y) for x, y in zip(first, sampler, strict=True))
    with pytest.raises(ValueError):
        sampler.update_descriptors(desc[:-1])


def test_hard_negative_sampler_chunking_does_not_change_result() -> None:
    ids, desc, _ = clustered_dataset(2)
    rng = np.random.default_rng(1)
    desc = rng.normal(size=desc.shape).astype(np.float32)  # no cluster structure, many ties-free
    small = HardNegativeSampler(ids, desc, 6, 5, group_size=3, seed=9, chunk_size=2)
    large = HardNegativeSampler(ids, desc, 6, 5, group_size=3, seed=9, chunk_size=10_000)
    for x, y in zip(small, large, strict=True):
        np.testing.assert_array_equal(x, y)
