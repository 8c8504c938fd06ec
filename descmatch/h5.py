"""HDF5 files: the schema and reading. With h5schema.py and h5write.py (the writer), the only
modules that import h5py.

features.h5 (hloc-compatible): one group per image, named by its path relative to the
image root (``a/b.jpg`` is the nested group a -> b.jpg), holding
    keypoints    (N,2) float32  pixel coordinates, centre of the top-left pixel at (0,0)
    descriptors  (D,N) float32 or float16 (transposed, as hloc stores them)
    scores       (N,)  float32  detector response
    scales       (N,)  float32  keypoint size (OpenCV diameter, pixels)
    oris         (N,)  float32  orientation, degrees (OpenCV convention)
    image_size   (2,)  int32    (width, height) of the original image
File attributes: descmatch_schema, descmatch_kind="features", descmatch_version, method,
descriptor_dim, weights, weights_sha256, settings (JSON: detector and patch settings).

matches.h5 (hloc-compatible): one group per pair, key pair_key(name0, name1) (hloc's), or
escaped_pair_key(name0, name1) where hloc's key collides (see pairkeys.py), holding
    matches0           (N0,) int32   index into image 1's keypoints, or -1
    matching_scores0   (N0,) float32 similarity of the match (0 where unmatched)
and the attributes name0, name1 (the two image names); find_pair looks a pair up.
File attributes: descmatch_schema, descmatch_kind="matches", descmatch_version, features
(source file name), method, settings (JSON: ratio, mutual).

Writing: the output file is never modified in place. A run writes new groups into
``OUT.part`` (flushed and marked complete per group), and at the end (also on Ctrl-C) merges
them into a copy of OUT that atomically replaces it. A killed run leaves OUT untouched and
the .part file, whose complete groups the next run keeps. While it writes, a run holds the
lock of OUT (lock.py): a second writer stops with an error naming the first, and part files
are only ever resumed, merged or removed by the lock's holder. A merge that fails (a full
disk) removes its temporary copy and keeps OUT and the part files as they were.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import InputError
from .h5schema import (
    _LEAF,
    SCHEMA_VERSION,
    _check_attrs,
    _leaf_keys,
    _open,
    _owner,
    check_file,
    settings_json,
)
from .h5write import Shard, Writer, leftover_parts, part_path
from .pairkeys import Pair, escaped_pair_key, pair_key, parse_escaped_key

__all__ = [
    "SCHEMA_VERSION",
    "Reader",
    "Shard",
    "Writer",
    "check_file",
    "escaped_pair_key",
    "find_pair",
    "leftover_parts",
    "pair_key",
    "part_path",
    "read_features",
    "read_matches",
    "settings_json",
    "stored_pairs",
]

log = logging.getLogger(__name__)


class Reader:
    """Reads groups of a features or matches file, keeping the file open."""

    def __init__(self, path: str | Path, kind: str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file")
        self._f = _open(self.path, "r")
        try:
            self.attrs = _check_attrs(self.path, self._f, kind)
        except Exception:
            self._f.close()
            raise
        self.kind = kind
        self.keys = _leaf_keys(self._f, kind)

    @property
    def settings(self) -> dict[str, Any]:
        return json.loads(self.attrs.get("settings", "{}"))

    def __contains__(self, key: str) -> bool:
        return key in self._f and _LEAF[self.kind] in self._f[key]

    def owner(self, key: str) -> Pair | None:
        """The image names a stored pair records (matches files), None when it does not."""
        return _owner(self._f[key]) if key in self else None

    def read(self, key: str) -> dict[str, np.ndarray]:
        if key not in self:
            raise InputError(f"{self.path}: has no entry {key!r}")
        g = self._f[key]
        return {name: g[name][()] for name in g if isinstance(g[name], h5py.Dataset)}

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_features(path: str | Path, name: str) -> dict[str, np.ndarray]:
    with Reader(path, "features") as r:
        return r.read(name)


def find_pair(r: Reader, name0: str, name1: str) -> tuple[str, bool] | None:
    """The key of a pair in a matches file and whether it is stored the other way round
    (then ``matches0`` indexes name1's keypoints); None when the file does not hold it.

    The escaped key first, then hloc's key when its group names this pair or no pair (a file
    written by hloc): an hloc key that names another pair is that pair's."""
    orders = ((name0, name1, False), (name1, name0, True))
    for a, b, swapped in orders:
        key = escaped_pair_key(a, b)
        if key in r:
            return key, swapped
    for a, b, swapped in orders:
        key = pair_key(a, b)
        if key in r and r.owner(key) in (None, (a, b)):
            return key, swapped
    return None


def stored_pairs(r: Reader, names: Iterable[str]) -> tuple[list[tuple[str, str, str]], int]:
    """(key, name0, name1) of every stored pair between ``names`` (name0: the image whose
    keypoints ``matches0`` indexes), and how many stored pairs are not between them.

    An escaped key and a group that records its names say which pair they are; a bare hloc
    key (a file of hloc) is read back through the names, and is an InputError when two of
    the names share its dashed form."""
    dashed: dict[str, list[str]] = {}
    for n in names:
        dashed.setdefault(n.replace("/", "-"), []).append(n)
    known = {n for group in dashed.values() for n in group}
    found: list[tuple[str, str, str]] = []
    skipped = 0
    for key in sorted(r.keys):
        pair = parse_escaped_key(key) or r.owner(key)
        if pair is None and key.count("/") == 1:
            parts = [dashed.get(p, []) for p in key.split("/")]
            for group in parts:
                if len(group) > 1:
                    raise InputError(
                        f"{r.path}: pair {key} may be {' or '.join(group)} (hloc's key replaces "
                        "'/' by '-' and the file does not record the names); match again "
                        "with descmatch"
                    )
            if all(parts):
                pair = (parts[0][0], parts[1][0])
        if pair is None or pair[0] == pair[1] or not set(pair) <= known:
            skipped += 1
        else:
            found.append((key, pair[0], pair[1]))
    return found, skipped


def read_matches(path: str | Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """Matches of a pair as (matches0, matching_scores0), indexing name0's keypoints."""
    with Reader(path, "matches") as r:
        found = find_pair(r, name0, name1)
        if found is None or found[1]:
            hint = " (stored the other way round)" if found is not None else ""
            raise InputError(f"{path}: has no matches for {name0} {name1}{hint}")
        d = r.read(found[0])
        return d["matches0"], d["matching_scores0"]
