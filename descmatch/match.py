"""Mutual nearest neighbour + Lowe's ratio test as chunked matrix products on the device,
and the match stage (features.h5 + pairs -> matches.h5)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .distributed import session
from .errors import InputError
from .h5 import Reader, Shard, Writer, pair_key, settings_json
from .pairs import write_pairs

log = logging.getLogger(__name__)

DEFAULT_RATIO = 0.85
MAX_ELEMENTS = 1 << 26  # distance-matrix entries per chunk: 256 MB in float32


@torch.inference_mode()
def match_descriptors(
    desc0: torch.Tensor,
    desc1: torch.Tensor,
    ratio: float | None = DEFAULT_RATIO,
    mutual: bool = True,
    max_elements: int = MAX_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match rows of desc0 to rows of desc1 by L2 distance.

    A row i matches its nearest neighbour j when (ratio) d(i,j) < ratio * d(i, second
    nearest) and (mutual) i is also j's nearest neighbour. The distance matrix is computed
    in row chunks of at most ``max_elements`` entries, so memory stays bounded; column
    minima are tracked across chunks. NaN descriptors never match; with a single candidate
    the ratio test passes. Ties (identical candidates) fail the ratio test.

    Shape: desc0 (N0,D), desc1 (N1,D) -> matches0 (N0,) int64 (-1 = none), scores0 (N0,)
    float32 (1 - d^2/2: the cosine similarity for unit descriptors; 0 where unmatched).
    """
    n0, n1 = desc0.shape[0], desc1.shape[0]
    device = desc0.device
    matches = torch.full((n0,), -1, dtype=torch.long, device=device)
    scores = torch.zeros((n0,), dtype=torch.float32, device=device)
    if n0 == 0 or n1 == 0:
        return matches, scores
    if desc0.shape[1] != desc1.shape[1]:
        raise ValueError(f"descriptor sizes differ: {desc0.shape[1]} vs {desc1.shape[1]}")
    a = desc0.float()
    b = desc1.float().to(device)
    na = (a * a).sum(1)
    nb = (b * b).sum(1)
    inf = torch.tensor(float("inf"), device=device)
    chunk = max(1, max_elements // n1)
    best = torch.empty((n0,), dtype=torch.long, device=device)
    d1 = torch.empty((n0,), device=device)
    d2 = torch.full((n0,), float("inf"), device=device)
    col_min = torch.full((n1,), float("inf"), device=device)
    col_arg = torch.full((n1,), -1, dtype=torch.long, device=device)
    bt = b.t().contiguous()
    for s in range(0, n0, chunk):
        e = min(n0, s + chunk)
        dist = torch.addmm(na[s:e, None] + nb[None, :], a[s:e], bt, alpha=-2.0).clamp_min_(0)
        dist = torch.where(torch.isnan(dist), inf, dist)
        if n1 >= 2:
            vals, idx = torch.topk(dist, 2, dim=1, largest=False)
            d1[s:e], d2[s:e], best[s:e] = vals[:, 0], vals[:, 1], idx[:, 0]
        else:
            d1[s:e], best[s:e] = dist[:, 0], 0
        if mutual:
            cmin, carg = dist.min(dim=0)
            better = cmin < col_min
            col_min = torch.where(better, cmin, col_min)
            col_arg = torch.where(better, carg + s, col_arg)
    ok = torch.isfinite(d1)
    if ratio is not None:
        ok &= d1 < (ratio * ratio) * d2
    if mutual:
        ok &= col_arg[best] == torch.arange(n0, device=device)
    matches[ok] = best[ok]
    scores[ok] = (1.0 - 0.5 * d1[ok]).clamp(-1.0, 1.0)
    return matches, scores


@dataclass
class MatchResult:
    path: Path
    pairs_path: Path | None
    pairs: int = 0
    matched: int = 0
    skipped: int = 0
    matches_total: int = 0
    seconds: float = 0.0
    per_pair: list[tuple[str, str, int]] = field(default_factory=list)


class _FeatureCache:
    """Descriptors on the device, least recently used evicted beyond ``capacity`` images."""

    def __init__(self, reader: Reader, device: torch.device, capacity: int = 64) -> None:
        self.reader, self.device, self.capacity = reader, device, capacity
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, name: str) -> torch.Tensor:
        if name in self._d:
            self._d.move_to_end(name)
            return self._d[name]
        desc = self.reader._f[name]["descriptors"][()]  # (D,N)
        t = torch.from_numpy(np.ascontiguousarray(desc.T)).to(self.device).float()
        self._d[name] = t
        if len(self._d) > self.capacity:
            self._d.popitem(last=False)
        return t


def match(
    features: str | Path,
    pairs: list[tuple[str, str]],
    out: str | Path,
    ratio: float | None = DEFAULT_RATIO,
    mutual: bool = True,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    pairs_out: str | Path | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> MatchResult:
    """Match every pair of images of a features file into a matches file (resumable).

    Under ``torchrun`` with several processes each matches every N-th pair still to do into
    its own part file, rank 0 merges them into ``out`` and writes the pairs file, and every
    rank returns the run's totals.
    """
    features = Path(features)
    out = Path(out)
    device = torch.device(device)
    t0 = time.perf_counter()
    with Reader(features, "features") as reader:
        if int(reader.attrs.get("descriptor_dim", 0)) <= 0:
            raise InputError(f"{features}: holds keypoints only (made by detect); run extract")
        known = set(reader.keys)
        for a, b in pairs:
            for n in (a, b):
                if n not in known:
                    raise InputError(f"{features}: has no image {n!r} named in the pairs")
        settings = {"ratio": ratio, "mutual": mutual}
        attrs = {"features": features.name, "method": reader.attrs.get("method", ""),
                 "settings": settings_json(settings)}
        result = MatchResult(out, None)
        cache = _FeatureCache(reader, device)
        with session(device) as d, Writer(out, "matches", attrs,
                                           must_match=("method", "settings"),
                                           overwrite=overwrite,
                                           shard=Shard(d.rank, d.world_size, d.barrier)) as writer:
            pending = [(a, b) for a, b in pairs
                       if pair_key(a, b) not in writer.done and pair_key(b, a) not in writer.done]
            result.skipped = len(pairs) - len(pending)
            todo = d.shard(pending)
            if d.active:
                log.info("rank %d of %d: %d of %d pairs", d.rank, d.world_size, len(todo),
                         len(pending))
            for i, (a, b) in enumerate(todo):
                key = pair_key(a, b)
                m, s = match_descriptors(cache.get(a), cache.get(b), ratio, mutual)
                m_np = m.to(torch.int32).cpu().numpy()
                writer.write(key, {"matches0": m_np, "matching_scores0": s.cpu().numpy()})
                n = int((m_np >= 0).sum())
                result.matched += 1
                result.matches_total += n
                result.per_pair.append((a, b, n))
                if progress:
                    progress(i + 1, len(todo), key)
            if d.active:
                ranks = d.gather(result)
                result.matched = sum(r.matched for r in ranks)
                result.matches_total = sum(r.matches_total for r in ranks)
                result.per_pair = [p for r in ranks for p in r.per_pair]
    result.pairs = len(pairs)
    if pairs_out is None:
        pairs_out = out.with_name(out.stem + "-pairs.txt")
    if d.main:
        result.pairs_path = write_pairs(pairs_out, pairs)
    else:
        result.pairs_path = Path(pairs_out)
    result.seconds = time.perf_counter() - t0
    return result
