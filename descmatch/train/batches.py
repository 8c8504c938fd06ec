"""Batches from several pools with mixing weights (:class:`MixedBatches`): one pool per batch,
drawn with probability proportional to its weight (so a batch never mixes easy cross-source
negatives in), its points chosen by that pool's sampler from :data:`~.samplers.SAMPLERS`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError
from .pool import PairPool
from .samplers import SAMPLERS, SamplerOptions, make_sampler


def _sub_seed(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0])


class MixedBatches:
    """Batches from several pools with mixing weights.

    Batch ``step`` is a pure function of ``(seed, step)`` (and, for ``hard-negative``, of the
    descriptors of the last :meth:`mine`): its pool is drawn with probability proportional to
    the weights and its points by that pool's sampler (``sampler``, one of :data:`SAMPLERS`),
    so a resumed run sees the same batches, and ``rank``/``world_size`` take a slice of each
    batch (rows ``rank::world_size``) for data-parallel training.

    Samplers: ``same-image`` (:class:`~.samplers.SameImageSampler`, ``images_per_batch`` photos per
    batch), ``random`` (:class:`~descmatch.train.pointsamplers.HardNetSampler`), ``progressive``
    (:class:`~descmatch.train.pointsamplers.ProgressiveSampler`, ``p1_fraction`` of a batch walks
    the pool in a shuffled sequence, a new one each pass, the rest is random) and
    ``hard-negative`` (:class:`~.samplers.MinedSampler`, ``mine_points`` and
    ``mine_group``): its batches need :meth:`mine` with the current net whenever
    :meth:`needs_mining` (every ``mine_every`` steps); :meth:`mining_state` and
    :meth:`load_mining_state` carry what was mined through a checkpoint.

    Shape: ``batch(step)`` -> (batch_size,2,P,P) uint8, and the index of the pool used.
    """

    def __init__(
        self,
        pools: Sequence[PairPool],
        weights: Sequence[float],
        batch_size: int,
        images_per_batch: int = 4,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        sampler: str = "same-image",
        p1_fraction: float = 0.5,
        mine_every: int = 1000,
        mine_points: int = 32768,
        mine_group: int | None = 64,
    ) -> None:
        if not pools or len(pools) != len(weights):
            raise ConfigError("give one weight per data source")
        w = np.asarray(weights, np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError(f"data weights must be >= 0 and not all 0, got {list(weights)}")
        sizes = {p.patch_size for p in pools}
        if len(sizes) != 1:
            raise ConfigError(f"data sources have different patch sizes: {sorted(sizes)}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if mine_every < 1 or mine_points < 2:
            raise ConfigError("mine_every must be >= 1 and mine_points >= 2")
        self.pools = list(pools)
        self.weights = w / w.sum()
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.mine_every = int(mine_every)
        self.mined_round: int | None = None
        options = SamplerOptions(images_per_batch, p1_fraction, mine_points, mine_group)
        self.samplers: list[Any] = [
            make_sampler(sampler, p, batch_size, options, _sub_seed(self.seed, k, 43))
            for k, p in enumerate(self.pools)
        ]

    def batch(self, step: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, int(step), 17])
        k = int(rng.choice(len(self.pools), p=self.weights)) if len(self.pools) > 1 else 0
        if self.needs_mining(step):
            raise RuntimeError(f"batch {step}: mine round {step // self.mine_every} first")
        pts = self.samplers[k].batch_points(rng, int(step))
        if self.world_size > 1:
            pts = pts[self.rank :: self.world_size]
        return self.pools[k].gather(pts, rng), k

    # Hard-negative mining.

    @property
    def mines(self) -> bool:
        """Whether the batches need descriptors (the ``hard-negative`` sampler)."""
        return self.sampler == "hard-negative"

    def needs_mining(self, step: int) -> bool:
        """Whether batch ``step`` needs a :meth:`mine` first (a new round of ``mine_every``
        steps)."""
        return self.mines and self.mined_round != int(step) // self.mine_every

    def mine(self, step: int, describe: Callable[[np.ndarray], np.ndarray]) -> None:
        """Describe a new random subset of every pool in use with ``describe`` (the current
        net: (N,P,P) uint8 patches -> (N,D) descriptors) for the round of batch ``step``. The
        subsets and patches are a pure function of ``(seed, round)``."""
        r = int(step) // self.mine_every
        for k, (pool, sampler) in enumerate(zip(self.pools, self.samplers, strict=True)):
            if self.weights[k] <= 0:
                continue
            rng = np.random.default_rng([self.seed, r, k, 37])
            subset = sampler.draw_subset(rng)
            patches = np.ascontiguousarray(pool.gather(subset, rng)[:, 0])
            sampler.set_descriptors(subset, describe(patches))
        self.mined_round = r

    def mining_state(self) -> dict[str, Any] | None:
        """What was mined (the round; per pool its subset and float16 descriptors) as tensors,
        for a checkpoint; None when nothing is mined."""
        if not self.mines or self.mined_round is None:
            return None
        import torch

        pools: list[dict[str, Any] | None] = []
        for s in self.samplers:
            if s.subset is None:
                pools.append(None)
            else:
                pools.append(
                    {
                        "subset": torch.from_numpy(s.subset.copy()),
                        "descriptors": torch.from_numpy(s.descriptors.copy()),
                    }
                )
        return {"round": int(self.mined_round), "mine_every": self.mine_every, "pools": pools}

    def load_mining_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`mining_state` (nothing when it does not fit these settings: the next
        batch then mines again)."""
        if (
            not self.mines
            or not state
            or int(state.get("mine_every", -1)) != self.mine_every
            or len(state.get("pools", [])) != len(self.samplers)
        ):
            return
        for s, st in zip(self.samplers, state["pools"], strict=True):
            if st is not None:
                subset = st["subset"].numpy()
                if len(subset) != s.subset_size or subset.max(initial=0) >= s.num_points:
                    return
        for s, st in zip(self.samplers, state["pools"], strict=True):
            if st is not None:
                s.set_descriptors(st["subset"].numpy(), st["descriptors"].numpy())
        self.mined_round = int(state["round"])
