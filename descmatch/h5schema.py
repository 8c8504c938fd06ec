"""The HDF5 schema's low-level pieces shared by the reader (h5.py) and the writer
(h5write.py): opening, validation, leaf groups, error wording. See h5.py for the schema."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py

from .errors import InputError, OutputError, SchemaError
from .pairkeys import Pair

SCHEMA_VERSION = 1
_COMPLETE = "_descmatch_complete"
_LEAF = {"features": "keypoints", "matches": "matches0"}


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


def _why(e: BaseException) -> str:
    """An OS or HDF5 write error in a few words (h5py hides errno in its message)."""
    code = getattr(e, "errno", None)
    if code:
        return os.strerror(code)
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS):
        if f"errno = {code}," in text or f"[Errno {code}]" in text:
            return os.strerror(code)
    return _short(e) if isinstance(e, Exception) else type(e).__name__


def _owner(g: h5py.Group) -> Pair | None:
    """The image names a pair group records (None: not recorded, e.g. written by hloc)."""
    n0, n1 = g.attrs.get("name0"), g.attrs.get("name1")
    if n0 is None or n1 is None:
        return None
    return (
        n0.decode() if isinstance(n0, bytes) else str(n0),
        n1.decode() if isinstance(n1, bytes) else str(n1),
    )


def _clear(g: h5py.Group) -> None:
    """Empty a leaf group of its datasets and attributes; subgroups stay (an escaped pair
    key may also be the first level of hloc keys)."""
    for name in [n for n in g if isinstance(g[n], h5py.Dataset)]:
        del g[name]
    for name in list(g.attrs):
        del g.attrs[name]


def _put(src: h5py.Group, dst: h5py.File, key: str) -> None:
    """Copy the leaf group ``src`` to ``dst[key]`` (its datasets and attributes)."""
    g = dst.require_group(key)
    _clear(g)
    for name in src:
        if isinstance(src[name], h5py.Dataset):
            src.copy(src[name], g, name=name)
    for k, v in src.attrs.items():
        if k != _COMPLETE:
            g.attrs[k] = v


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


def settings_json(settings: Mapping[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True)
