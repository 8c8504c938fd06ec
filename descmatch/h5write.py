"""Crash-safe, resumable, locked writing of features and matches files (see h5.py for the
schema and the writing protocol)."""

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
from .errors import OutputError, SchemaError
from .h5schema import (
    _COMPLETE,
    _LEAF,
    SCHEMA_VERSION,
    _check_attrs,
    _clear,
    _leaf_keys,
    _open,
    _owner,
    _put,
    _why,
)
from .lock import OutputLock
from .outputs import check_writable
from .pairkeys import Pair

log = logging.getLogger(__name__)


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
    Use as a context manager; ``done`` holds the keys that need no work, ``owners`` (matches
    files) the image names each stored pair group records. The output is locked from here
    to the end of the merge; ``wait`` waits for another writer instead of stopping.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        attrs: Mapping[str, Any],
        must_match: Iterable[str] = (),
        overwrite: bool = False,
        shard: Shard | None = None,
        wait: bool = False,
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
        self.owners: dict[str, Pair | None] = {}
        self.new_keys: list[str] = []
        self.renames: dict[str, str] = {}
        self._part: h5py.File | None = None
        self._existing_keys: set[str] = set()
        self._lock = OutputLock(self.path, wait=wait)
        try:
            self._prepare()
        except BaseException:
            self._lock.release()
            raise

    # -- setup -------------------------------------------------------------------------------
    def _check_same(self, where: Path, attrs: Mapping[str, Any]) -> None:
        for key in self.must_match:
            old, new = attrs.get(key), self.attrs.get(key)
            if isinstance(old, np.generic):
                old = old.item()
            if old != new:
                raise SchemaError(
                    f"{where}: holds {_difference(key, old, new)}; "
                    "write to another file or pass --overwrite"
                )

    def _prepare(self) -> None:
        check_writable(self.path)
        if self.shard.rank == 0:
            self._lock.acquire()  # before any rank looks at a part file
            if self._lock.previous and leftover_parts(self.path):
                log.info(
                    "%s: part files of an interrupted run (%s, no longer running)",
                    self.path,
                    self._lock.previous,
                )
        if self.shard.world_size > 1:
            self.shard.barrier()
        if self.path.exists() and not self.overwrite:
            with _open(self.path, "r") as f:
                attrs = _check_attrs(self.path, f, self.kind)
                self._check_same(self.path, attrs)
                self._existing_keys = set(self._read_keys(f))
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

    def _read_keys(self, f: h5py.File, complete_only: bool = False) -> list[str]:
        keys = _leaf_keys(f, self.kind, complete_only)
        if self.kind == "matches":
            for k in keys:
                self.owners[k] = _owner(f[k])
        return keys

    def _complete_keys(self, part: Path) -> set[str]:
        """Complete entries of a leftover part file, read-only (another rank owns it)."""
        try:
            f = h5py.File(part, "r")
        except OSError:
            log.warning("%s: unreadable leftover of an interrupted run, ignored", part)
            return set()
        with f:
            if not _leaf_keys(f, self.kind, complete_only=True):  # nothing to keep (it may
                return set()  # have been cut short before its attributes were written)
            self._check_same(part, _check_attrs(part, f, self.kind))
            return set(self._read_keys(f, complete_only=True))

    def _recover_part(self) -> None:
        try:
            f = h5py.File(self.part_path, "a")
        except OSError:
            log.warning("%s: unreadable leftover of an interrupted run, discarded", self.part_path)
            self.part_path.unlink()
            return
        if not _leaf_keys(f, self.kind, complete_only=True):  # nothing to keep (it may have
            f.close()  # been cut short before its attributes were written)
            log.warning("%s: empty leftover of an interrupted run, discarded", self.part_path)
            self.part_path.unlink()
            return
        try:
            attrs = _check_attrs(self.part_path, f, self.kind)
            self._check_same(self.part_path, attrs)
            complete = set(_leaf_keys(f, self.kind, complete_only=True))
            for key in set(_leaf_keys(f, self.kind)) - complete:
                _clear(f[key])
            self._read_keys(f, complete_only=True)
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

    def write(
        self,
        key: str,
        datasets: Mapping[str, np.ndarray],
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one group and flush; the group counts only once it is marked complete.

        A write that fails (a full disk) is an OutputError; the groups written before it are
        kept in the part file."""
        f = self._part_file()
        g = None
        try:
            g = f.require_group(key)
            _clear(g)
            for name, arr in datasets.items():
                g.create_dataset(name, data=arr)
            for k, v in (attrs or {}).items():
                g.attrs[k] = v
            g.attrs[_COMPLETE] = True
            f.flush()
        except (OSError, RuntimeError) as e:
            try:  # the entry is not complete: it must not be merged
                if g is not None and _COMPLETE in g.attrs:
                    del g.attrs[_COMPLETE]
            except (OSError, RuntimeError):
                pass
            raise OutputError(
                f"{self.part_path}: cannot write ({_why(e)}); the entries written before "
                "are kept there: free space and run the same command to resume"
            ) from None
        self.new_keys.append(key)
        self.done.add(key)

    def rename(self, old: str, new: str) -> None:
        """Move a stored group to another key at the merge (a pair whose hloc key now
        collides)."""
        self.renames[old] = new
        self.done.add(new)

    # -- finishing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Merge the new groups into the output, atomically replacing it, and unlock it.

        With several processes (``shard``), each closes its own part file, and after a
        barrier rank 0 merges every part into the output while the others wait.
        """
        try:
            if self._part is not None:
                part, self._part = self._part, None
                part.close()
            self.shard.barrier()
            if self.shard.rank == 0:
                self._merge()
            self.shard.barrier()
        finally:
            self._lock.release()

    def _merge(self) -> None:
        parts = leftover_parts(self.path)
        if not parts and not self.renames:
            return
        sources: list[tuple[Path, list[str]]] = []
        for p in parts:
            keys = sorted(self._complete_keys(p))
            if keys:
                sources.append((p, keys))
        if not (sources or self.renames or self.overwrite or not self.path.exists()):
            for p in parts:
                p.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            if self.path.exists() and not self.overwrite:
                shutil.copyfile(self.path, tmp)
                out = _open(tmp, "a")
            else:
                out = _open(tmp, "w")
            try:
                for k, v in self.attrs.items():
                    out.attrs[k] = v
                for old, new in self.renames.items():
                    if old in out and _LEAF[self.kind] in out[old]:
                        _put(out[old], out, new)
                        _remove(out, old)
                for p, keys in sources:
                    with h5py.File(p, "r") as part:
                        for key in keys:
                            _put(part[key], out, self.renames.get(key, key))
                out.flush()
            finally:
                out.close()
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, (OSError, RuntimeError)) and not isinstance(e, OutputError):
                kept = ", ".join(p.name for p in parts) or "nothing new"
                raise OutputError(
                    f"{self.path}: cannot write the merged output ({_why(e)}); it is left as "
                    f"it was and the new work is kept in {kept}: free space and run the same "
                    "command to finish"
                ) from None
            raise
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
            self._lock.release()
            return
        self.close()


def _remove(f: h5py.File, key: str) -> None:
    """Delete a leaf group's data (the group too when nothing else is in it), then the
    parent groups it leaves empty."""
    g = f[key]
    _clear(g)
    while key and len(f[key]) == 0 and not f[key].attrs:
        del f[key]
        key = key.rsplit("/", 1)[0] if "/" in key else ""


def _difference(key: str, old: Any, new: Any) -> str:
    """What differs between a file's attribute and this run's, naming the settings that do."""
    if key == "settings":
        try:
            a, b = json.loads(old), json.loads(new)
        except (TypeError, ValueError):
            a = b = None
        if isinstance(a, dict) and isinstance(b, dict):
            diff = [
                f"{k}={a.get(k, '(none)')!r} (this run: {b.get(k, '(none)')!r})"
                for k in sorted(set(a) | set(b))
                if a.get(k, "(none)") != b.get(k, "(none)")
            ]
            return "other settings: " + ", ".join(diff)
    return f"{key}={old!r} but this run makes {key}={new!r}"


# -- reading ---------------------------------------------------------------------------------
