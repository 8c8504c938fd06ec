"""The match stage: a features file and image pairs to a matches file (resumable, locked,
sharded under torchrun), with the matcher of :mod:`descmatch.matcher`."""

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
from .h5 import Reader, Shard, Writer, settings_json
from .matcher import DEFAULT_RATIO, MATCH_PRECISIONS, MAX_ELEMENTS, match_descriptors
from .outputs import check_writable, refuse_inputs
from .pairkeys import plan_keys
from .pairs import write_pairs

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RATIO",
    "MATCH_PRECISIONS",
    "MAX_ELEMENTS",
    "MatchResult",
    "match",
    "match_descriptors",
]


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
    inputs: tuple[str | Path, ...] = (),
    wait: bool = False,
) -> MatchResult:
    """Match every pair of images of a features file into a matches file (resumable).

    Each pair is stored under hloc's key, or under an escaped key where hloc's collides
    (see pairkeys.py). Before any work, OutputError when ``out`` or the pairs file is the
    features file or one of ``inputs`` (e.g. the pairs file read), or cannot be written;
    while it writes, ``out`` is locked (``wait``: wait for another writer to finish).
    Under ``torchrun`` with several processes each matches every N-th pair still to do into
    its own part file, rank 0 merges them into ``out`` and writes the pairs file, and every
    rank returns the run's totals.
    """
    features = Path(features)
    out = Path(out)
    device = torch.device(device)
    t0 = time.perf_counter()
    if pairs_out is None:
        pairs_out = out.with_name(out.stem + "-pairs.txt")
    refuse_inputs(out, (features, *inputs), "matches file")
    refuse_inputs(pairs_out, (features, out, *inputs), "pairs file to write")
    check_writable(pairs_out, "pairs file")
    with Reader(features, "features") as reader:
        if int(reader.attrs.get("descriptor_dim", 0)) <= 0:
            raise InputError(f"{features}: holds keypoints only (made by detect); run extract")
        known = set(reader.keys)
        for a, b in pairs:
            for n in (a, b):
                if n not in known:
                    raise InputError(f"{features}: has no image {n!r} named in the pairs")
        settings = {"ratio": ratio, "mutual": mutual}
        attrs = {
            "features": features.name,
            "method": reader.attrs.get("method", ""),
            "settings": settings_json(settings),
        }
        result = MatchResult(out, None)
        cache = _FeatureCache(reader, device)
        with (
            session(device) as d,
            Writer(
                out,
                "matches",
                attrs,
                must_match=("method", "settings"),
                overwrite=overwrite,
                shard=Shard(d.rank, d.world_size, d.barrier),
                wait=wait,
            ) as writer,
        ):
            plan = plan_keys(pairs, {k: writer.owners.get(k) for k in writer.done})
            for old, new in plan.renames.items():
                log.info("%s: %s moves to %s (its hloc key collides)", out, old, new)
                writer.rename(old, new)
            collide = sum(1 for p, k in plan.keys.items() if "/" not in k)
            if collide:
                log.warning(
                    "%s: %d pair(s) whose hloc keys collide (image names that differ only by "
                    "'/' and '-') are stored under escaped keys",
                    out,
                    collide,
                )
            pending = [p for p in pairs if p not in plan.done]
            result.skipped = len(pairs) - len(pending)
            todo = d.shard(pending)
            if d.active:
                log.info(
                    "rank %d of %d: %d of %d pairs", d.rank, d.world_size, len(todo), len(pending)
                )
            for i, (a, b) in enumerate(todo):
                key = plan.keys[(a, b)]
                m, s = match_descriptors(cache.get(a), cache.get(b), ratio, mutual)
                m_np = m.to(torch.int32).cpu().numpy()
                writer.write(
                    key,
                    {"matches0": m_np, "matching_scores0": s.cpu().numpy()},
                    {"name0": a, "name1": b},
                )
                count = int((m_np >= 0).sum())
                result.matched += 1
                result.matches_total += count
                result.per_pair.append((a, b, count))
                if progress:
                    progress(i + 1, len(todo), key)
            if d.active:
                ranks = d.gather(result)
                result.matched = sum(r.matched for r in ranks)
                result.matches_total = sum(r.matches_total for r in ranks)
                result.per_pair = [p for r in ranks for p in r.per_pair]
    result.pairs = len(pairs)
    if d.main:
        result.pairs_path = write_pairs(pairs_out, pairs)
    else:
        result.pairs_path = Path(pairs_out)
    result.seconds = time.perf_counter() - t0
    return result
