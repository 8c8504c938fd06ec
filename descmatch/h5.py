"""HDF5 files: the schema, validation and crash-safe resumable writing. The only module that
imports h5py.

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

matches.h5 (hloc-compatible): one group per pair, key pair_key(name0, name1), holding
    matches0           (N0,) int32   index into image 1's keypoints, or -1
    matching_scores0   (N0,) float32 similarity of the match (0 where unmatched)
File attributes: descmatch_schema, descmatch_kind="matches", descmatch_version, features
(source file name), method, settings (JSON: ratio, mutual).

Writing: the output file is never modified in place. A run writes new groups into
``OUT.part`` (flushed and marked complete per group), and at the end (also on Ctrl-C) merges
them into a copy of OUT that atomically replaces it. A killed run leaves OUT untouched and
the .part file, whose complete groups the next run keeps.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import InputError, OutputError, SchemaError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_COMPLETE = "_descmatch_complete"
_LEAF = {"features": "keypoints", "matches": "matches0"}


def pair_key(name0: str, name1: str) -> str:
    """hloc's pair naming: slashes in image names become dashes."""
    return name0.replace("/", "-") + "/" + name1.replace("/", "-")


def _open(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if mode == "r":
            raise SchemaError(f"{path}: not a readable HDF5 file ({_short(e)})") from None
        raise OutputError(f"{path}: cannot write ({_short(e)})") from None


def _short(e: Exception) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg.split("(")[0].strip() or msg


def _leaf_keys(f: h5py.Group, kind: str, complete_only: bool = False) -> list[str]:
    leaf = _LEAF[kind]
    keys: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and leaf in obj:
            if not complete_only or obj.attrs.get(_COMPLETE, False):
                keys.append(name)

    f.visititems(visit)
    return keys


def check_file(path: Path, kind: str) -> dict[str, Any]:
    """Validate an existing descmatch file of ``kind`` and return its attributes."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    with _open(path, "r") as f:
        return _check_attrs(path, f, kind)


def _check_attrs(path: Path, f: h5py.File, kind: str) -> dict[str, Any]:
    attrs = dict(f.attrs)
    if "descmatch_schema" not in attrs:
        raise SchemaError(f"{path}: not a descmatch {kind} file (no descmatch_schema attribute)")
    version = int(attrs["descmatch_schema"])
    if version != SCHEMA_VERSION:
        raise SchemaError(
            f"{path}: schema version {version}, this descmatch reads version {SCHEMA_VERSION}"
        )
    if attrs.get("descmatch_kind") != kind:
        raise SchemaError(f"{path}: holds {attrs.get('descmatch_kind')}, not {kind}")
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}


@dataclass
class Shard:
    """The process's place when several write one file (``barrier`` waits for all)."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None)


def part_path(path: Path, rank: int = 0) -> Path:
    """Where a run writes before merging: OUT.part (rank 0, or one process), OUT.rankN.part."""
    return path.with_name(path.name + (".part" if rank == 0 else f".rank{rank}.part"))


def leftover_parts(path: Path) -> list[Path]:
    """Part files of OUT on disk: rank 0's first, then the other ranks' in rank order."""
    found = [part_path(path)] if part_path(path).exists() else []
    ranked = []
    for p in path.parent.glob(glob.escape(path.name) + ".rank*.part"):
        r = p.name[len(path.name) + len(".rank") : -len(".part")]
        if r.isdigit():
            ranked.append((int(r), p))
    return found + [p for _, p in sorted(ranked)]


class Writer:
    """Crash-safe, resumable writer of one features or matches file.

    ``attrs`` are the file attributes of this run; ``must_match`` names those an existing
    file must share (e.g. method and descriptor_dim), otherwise SchemaError.
    Use as a context manager; ``done`` holds the keys that need no work.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        attrs: Mapping[str, Any],
        must_match: Iterable[str] = (),
        overwrite: bool = False,
        shard: Shard | None = None,
    ) -> None:
        self.path = Path(path)
        self.kind = kind
        self.attrs = {
            "descmatch_schema": SCHEMA_VERSION,
            "descmatch_kind": kind,
            "descmatch_version": __version__,
            **attrs,
        }
        self.must_match = tuple(must_match)
        self.overwrite = overwrite
        self.shard = shard if shard is not None else Shard()
        self.part_path = part_path(self.path, self.shard.rank)
        self.done: set[str] = set()
        self.new_keys: list[str] = []
        self._part: h5py.File | None = None
        self._existing_keys: set[str] = set()
        self._prepare()

    # -- setup -------------------------------------------------------------------------------
    def _check_same(self, where: Path, attrs: Mapping[str, Any]) -> None:
        for key in self.must_match:
            old, new = attrs.get(key), self.attrs.get(key)
            if isinstance(old, np.generic):
                old = old.item()
            if old != new:
                raise SchemaError(
                    f"{where}: holds {key}={old!r} but this run makes {key}={new!r}; "
                    "write to another file or pass --overwrite"
                )

    def _prepare(self) -> None:
        parent = self.path.parent
        if not parent.exists():
            raise OutputError(f"{self.path}: folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"{self.path}: folder {parent} is not writable")
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a folder, not a file")
        if self.path.exists() and not self.overwrite:
            with _open(self.path, "r") as f:
                attrs = _check_attrs(self.path, f, self.kind)
                self._check_same(self.path, attrs)
                self._existing_keys = set(_leaf_keys(f, self.kind))
        if self.overwrite:
            if self.shard.rank == 0:
                for p in leftover_parts(self.path):
                    p.unlink()
            self.shard.barrier()
        else:
            # Every leftover part (this rank's and those of other ranks or of an earlier run
            # with another number of processes) is read before any is opened for writing.
            for p in leftover_parts(self.path):
                if p != self.part_path:
                    self._existing_keys |= self._complete_keys(p)
            self.shard.barrier()
            if self.part_path.exists():
                self._recover_part()
        self.done = set(self._existing_keys)

    def _complete_keys(self, part: Path) -> set[str]:
        """Complete entries of a leftover part file, read-only (another process owns it)."""
        try:
            f = h5py.File(part, "r")
        except OSError:
            log.warning("%s: unreadable leftover of an interrupted run, ignored", part)
            return set()
        with f:
            self._check_same(part, _check_attrs(part, f, self.kind))
            return set(_leaf_keys(f, self.kind, complete_only=True))

    def _recover_part(self) -> None:
        try:
            f = h5py.File(self.part_path, "a")
        except OSError:
            log.warning("%s: unreadable leftover of an interrupted run, discarded", self.part_path)
            self.part_path.unlink()
            return
        try:
            attrs = _check_attrs(self.part_path, f, self.kind)
            self._check_same(self.part_path, attrs)
            complete = set(_leaf_keys(f, self.kind, complete_only=True))
            for key in set(_leaf_keys(f, self.kind)) - complete:
                del f[key]
            self.new_keys = sorted(complete - self._existing_keys)
            self._part = f
            log.info(
                "%s: resuming, %d entries kept from an interrupted run",
                self.part_path,
                len(complete),
            )
        except Exception:
            f.close()
            raise
        self._existing_keys |= complete

    # -- writing -----------------------------------------------------------------------------
    def _part_file(self) -> h5py.File:
        if self._part is None:
            self._part = _open(self.part_path, "w")
            for k, v in self.attrs.items():
                self._part.attrs[k] = v
        return self._part

    def write(self, key: str, datasets: Mapping[str, np.ndarray]) -> None:
        """Write one group and flush; the group counts only once it is marked complete."""
        f = self._part_file()
        if key in f:
            del f[key]
        g = f.create_group(key)
        for name, arr in datasets.items():
            g.create_dataset(name, data=arr)
        g.attrs[_COMPLETE] = True
        f.flush()
        self.new_keys.append(key)
        self.done.add(key)

    # -- finishing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Merge the new groups into the output, atomically replacing it.

        With several processes (``shard``), each closes its own part file, and after a
        barrier rank 0 merges every part into the output while the others wait.
        """
        if self._part is not None:
            part, self._part = self._part, None
            part.close()
        self.shard.barrier()
        if self.shard.rank == 0:
            self._merge()
        self.shard.barrier()

    def _merge(self) -> None:
        parts = leftover_parts(self.path)
        if not parts:
            return
        sources: list[tuple[Path, list[str]]] = []
        for p in parts:
            keys = sorted(self._complete_keys(p))
            if keys:
                sources.append((p, keys))
        if sources or self.overwrite or not self.path.exists():
            tmp = self.path.with_name(self.path.name + ".tmp")
            if self.path.exists() and not self.overwrite:
                shutil.copyfile(self.path, tmp)
                out = _open(tmp, "a")
            else:
                out = _open(tmp, "w")
            try:
                for k, v in self.attrs.items():
                    out.attrs[k] = v
                for p, keys in sources:
                    with h5py.File(p, "r") as part:
                        for key in keys:
                            if key in out:
                                del out[key]
                            parent = key.rsplit("/", 1)[0] if "/" in key else None
                            if parent:
                                out.require_group(parent)
                            part.copy(part[key], out, name=key)
                            del out[key].attrs[_COMPLETE]
                out.flush()
            finally:
                out.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        for p in parts:
            p.unlink(missing_ok=True)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and (self.overwrite or self.shard.world_size > 1):
            # An interrupted --overwrite run must not replace the complete old output with a
            # partial new one: keep the old output and leave the new work in OUT.part. A
            # failing rank cannot meet the others at the merge: its part waits for the next
            # run.
            if self._part is not None:
                self._part.close()
                self._part = None
            return
        self.close()


# -- reading ---------------------------------------------------------------------------------
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


def read_matches(path: str | Path, name0: str, name1: str) -> tuple[np.ndarray, np.ndarray]:
    """Matches of a pair as (matches0, matching_scores0), indexing name0's keypoints."""
    with Reader(path, "matches") as r:
        key = pair_key(name0, name1)
        if key not in r:
            hint = " (stored the other way round)" if pair_key(name1, name0) in r else ""
            raise InputError(f"{path}: has no matches for {name0} {name1}{hint}")
        d = r.read(key)
        return d["matches0"], d["matching_scores0"]


def settings_json(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)
