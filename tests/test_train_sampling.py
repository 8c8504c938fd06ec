"""Batch samplers in the training loop: the default composition is unchanged; random,
progressive and hard-negative batches are what they claim, deterministic, split over ranks,
and a run with each of them resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from descmatch.errors import ConfigError
from descmatch.train.batches import MixedBatches
from descmatch.train.descriptors import TrainConfig, read_log, train
from descmatch.train.pool import PairPool
from descmatch.train.samplers import SameImageSampler
from descmatch.weights import load_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny work: one thread is as fast


def make_pairs(n: int, p: int = 32, seed: int = 0) -> np.ndarray:
    """Random pairs whose point index is written into pixels (0,0) and (0,1) of both patches.
    Shape: -> (n,2,p,p) uint8."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, p, p), dtype=np.uint8)
    noise = rng.integers(-10, 11, (n, 1, p, p))
    pairs = np.concatenate([base, np.clip(base + noise, 0, 255).astype(np.uint8)], 1)
    pairs[:, :, 0, 0] = np.arange(n)[:, None] % 256
    pairs[:, :, 0, 1] = np.arange(n)[:, None] // 256
    return pairs


def point_index(batch: np.ndarray) -> np.ndarray:
    """The point indices written by :func:`make_pairs`. Shape: (B,2,P,P) -> (B,)."""
    assert np.array_equal(batch[:, 0, 0, :2], batch[:, 1, 0, :2])
    return batch[:, 0, 0, 0].astype(np.int64) + 256 * batch[:, 0, 0, 1].astype(np.int64)


def write_pool(path: Path, n: int = 256, groups: int = 4, p: int = 32, seed: int = 0) -> Path:
    """A pool folder of :func:`make_pairs` pairs in ``groups`` equal groups."""
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "pairs.npy", make_pairs(n, p, seed))
    offsets = np.linspace(0, n, groups + 1).astype(int).tolist()
    (path / "meta.json").write_text(
        json.dumps(
            {
                "format": "descmatch-pairpool",
                "version": 1,
                "kind": "photos",
                "num_pairs": n,
                "offsets": offsets,
                "patch_size": p,
                "mr_size": 6.0,
                "window_factor": 1.0,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pool(tmp_path_factory.mktemp("pool") / "pool", 256, 4)


def mem_pool(n: int = 120, groups: int = 3) -> PairPool:
    return PairPool(make_pairs(n), np.linspace(0, n, groups + 1).astype(int))


def test_default_composition_is_unchanged() -> None:
    pools = [mem_pool(120, 3), mem_pool(90, 2)]
    mb = MixedBatches(pools, [1.0, 2.0], 16, 2, seed=5)
    assert mb.sampler == "same-image" and not mb.mines and not mb.needs_mining(0)
    samplers = [SameImageSampler(p.group_offsets, p.num_points, 16, 2) for p in pools]
    for step in range(8):
        # What MixedBatches did before samplers were a choice.
        rng = np.random.default_rng([5, step, 17])
        k = int(rng.choice(2, p=np.array([1.0, 2.0]) / 3.0))
        want = pools[k].gather(samplers[k].points(rng), rng)
        got, gk = mb.batch(step)
        assert gk == k and np.array_equal(got, want)


@pytest.mark.parametrize("sampler", ["random", "progressive"])
def test_random_and_progressive_are_deterministic_and_split(sampler: str) -> None:
    pool = mem_pool(120, 3)
    mb = MixedBatches([pool], [1.0], 16, seed=3, sampler=sampler)
    again = MixedBatches([pool], [1.0], 16, seed=3, sampler=sampler)
    other = MixedBatches([pool], [1.0], 16, seed=4, sampler=sampler)
    halves = [
        MixedBatches([pool], [1.0], 16, seed=3, rank=r, world_size=2, sampler=sampler)
        for r in (0, 1)
    ]
    seen = set()
    for step in (0, 1, 7, 30):
        b, _ = mb.batch(step)
        pts = point_index(b)
        assert len(set(pts.tolist())) == 16
        seen |= set(pts.tolist())
        assert np.array_equal(b, again.batch(step)[0])
        assert not np.array_equal(b, other.batch(step)[0])
        r0, r1 = (point_index(h.batch(step)[0]) for h in halves)
        assert np.array_equal(r0, pts[0::2]) and np.array_equal(r1, pts[1::2])
    # Not confined to few images: points of every group.
    assert len({int(np.searchsorted(pool.group_offsets, q, "right")) for q in seen}) == 3


def test_progressive_walks_a_shuffled_sequence() -> None:
    pool = mem_pool(120, 3)
    mb = MixedBatches([pool], [1.0], 16, seed=0, sampler="progressive", p1_fraction=0.25)
    s = mb.samplers[0]
    assert (s.p1, s.p2, s.batches_per_pass) == (4, 12, 30)
    first = [point_index(mb.batch(step)[0]) for step in range(60)]
    walk = np.concatenate([f[:4] for f in first[:30]])
    assert sorted(walk.tolist()) == list(range(120))  # every point once per pass
    assert not np.array_equal(walk, np.arange(120))  # in a shuffled order
    walk2 = np.concatenate([f[:4] for f in first[30:]])
    assert sorted(walk2.tolist()) == list(range(120)) and not np.array_equal(walk, walk2)
    for f in first:  # the random part never repeats the sequential points
        assert not set(f[:4].tolist()) & set(f[4:].tolist())


def cluster_describe(patches: np.ndarray) -> np.ndarray:
    """A fake net: point q's descriptor is near the one-hot of its cluster q % 8."""
    q = patches[:, 0, 0].astype(np.int64) + 256 * patches[:, 0, 1].astype(np.int64)
    rng = np.random.default_rng(q)  # deterministic per call
    d = np.eye(8, dtype=np.float32)[q % 8] + rng.normal(0, 0.05, (len(q), 8)).astype(np.float32)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_hard_negative_batches_mining_and_state() -> None:
    pool = mem_pool(240, 3)
    mb = MixedBatches(
        [pool],
        [1.0],
        16,
        seed=1,
        sampler="hard-negative",
        mine_every=5,
        mine_points=96,
        mine_group=8,
    )
    assert mb.mines and mb.needs_mining(0) and mb.mining_state() is None
    with pytest.raises(RuntimeError):
        mb.batch(0)
    mb.mine(0, cluster_describe)
    assert not mb.needs_mining(4) and mb.needs_mining(5)
    subset = mb.samplers[0].subset
    assert len(subset) == 96 and len(set(subset.tolist())) == 96
    for step in range(5):
        pts = point_index(mb.batch(step)[0])
        assert len(set(pts.tolist())) == 16 and set(pts.tolist()) <= set(subset.tolist())
        # Each group of 8 rows is its seed (first row) and nearest neighbours: as many of the
        # seed's cluster as the subset has left, the rest from other clusters.
        left = {c: int((subset % 8 == c).sum()) for c in range(8)}
        for g in (0, 8):
            grp = pts[g : g + 8] % 8
            same = int((grp == grp[0]).sum())
            assert same == min(8, left[int(grp[0])]), (grp, left)
            for c in grp.tolist():
                left[c] -= 1
    # The state survives a checkpoint (weights_only) and gives the same batches.
    state = mb.mining_state()
    buf = __import__("io").BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    mb2 = MixedBatches(
        [pool],
        [1.0],
        16,
        seed=1,
        sampler="hard-negative",
        mine_every=5,
        mine_points=96,
        mine_group=8,
    )
    mb2.load_mining_state(loaded)
    assert not mb2.needs_mining(3)
    for step in range(5):
        assert np.array_equal(mb.batch(step)[0], mb2.batch(step)[0])
    # A new round mines a new subset.
    mb.mine(5, cluster_describe)
    assert not np.array_equal(mb.samplers[0].subset, subset)
    # A state of other settings is ignored (the next batch mines again).
    mb3 = MixedBatches(
        [pool], [1.0], 16, seed=1, sampler="hard-negative", mine_every=7, mine_points=96
    )
    mb3.load_mining_state(loaded)
    assert mb3.needs_mining(0)


def test_bad_sampler_settings() -> None:
    with pytest.raises(ConfigError):
        TrainConfig(sampler="nope").resolved()
    with pytest.raises(ConfigError):
        MixedBatches([mem_pool()], [1.0], 16, sampler="nope")
    with pytest.raises(ConfigError):
        MixedBatches([mem_pool()], [1.0], 500, sampler="random")
    with pytest.raises(ConfigError):
        MixedBatches([mem_pool()], [1.0], 16, sampler="progressive", p1_fraction=0.0)


class _Stop(Exception):
    pass


def _losses(texts: list[str]) -> list[float]:
    return [float(t.split()[1]) for t in texts]


@pytest.mark.parametrize("sampler", ["random", "progressive", "hard-negative"])
def test_sampler_runs_and_resumes_exactly(pool_dir: Path, tmp_path: Path, sampler: str) -> None:
    def cfg(out: Path) -> TrainConfig:
        # hardnet: dropout (global RNG); crash at step 3 is mid mining round 1 (steps 2..3).
        return TrainConfig(
            method="hardnet",
            data=[f"pool:{pool_dir}"],
            out_dir=out,
            steps=6,
            batch_size=16,
            checkpoint_every=3,
            log_every=1,
            val_pairs=40,
            eval_every=3,
            sampler=sampler,
            mine_every=2,
            mine_points=64,
            mine_group=8,
        )

    straight: list[str] = []
    a = train(cfg(tmp_path / "a"), lambda i, n, t: straight.append(t))
    first: list[str] = []

    def crash(i: int, n: int, t: str) -> None:
        first.append(t)
        if i == 3:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg(tmp_path / "b"), crash)
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 3
    if sampler == "hard-negative":
        assert ck["objective_state"]["round"] == 1
        assert ck["objective_state"]["pools"][0]["descriptors"].shape == (64, 128)
    else:
        assert ck["objective_state"] is None
    c = cfg(tmp_path / "b")
    c.resume = True
    resumed: list[str] = []
    b = train(c, lambda i, n, t: resumed.append(t))
    assert len(resumed) == 3 and _losses(first + resumed) == _losses(straight)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k
    assert [(r["step"], r["loss"], r["fpr95"]) for r in read_log(tmp_path / "a")] == [
        (r["step"], r["loss"], r["fpr95"]) for r in read_log(tmp_path / "b")
    ]
    meta = load_net("hardnet", b).meta
    assert meta["sampler"] == sampler and meta["steps"] == 6
