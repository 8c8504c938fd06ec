"""Image pairs to match: exhaustive, sequential, or read from a file (``name0 name1`` lines)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError, OutputError


def exhaustive(names: list[str]) -> list[tuple[str, str]]:
    return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))]


def sequential(names: list[str], k: int) -> list[tuple[str, str]]:
    """Each image with its next ``k`` neighbours in name order (video, ordered captures)."""
    if k < 1:
        raise InputError(f"sequential:{k}: the window must be at least 1")
    return [(names[i], names[j]) for i in range(len(names))
            for j in range(i + 1, min(len(names), i + 1 + k))]


def read_pairs(path: str | Path, known: set[str] | None = None) -> list[tuple[str, str]]:
    """Read a pairs file; with ``known``, every name must be one of them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such pairs file")
    pairs: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for i, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2:
            raise InputError(f"{path}:{i}: expected two image names, got {line!r}")
        a, b = parts[0], parts[1]
        if known is not None:
            for n in (a, b):
                if n not in known:
                    raise InputError(f"{path}:{i}: image {n!r} is not in the features file")
        if a == b:
            raise InputError(f"{path}:{i}: pairs an image with itself ({a})")
        if (a, b) in seen or (b, a) in seen:
            continue
        seen.add((a, b))
        pairs.append((a, b))
    return pairs


def pairs_from_spec(spec: str, names: list[str]) -> list[tuple[str, str]]:
    """``exhaustive``, ``sequential:K`` or a path to a pairs file."""
    if spec == "exhaustive":
        return exhaustive(names)
    if spec.startswith("sequential"):
        _, _, k = spec.partition(":")
        try:
            return sequential(names, int(k) if k else 5)
        except ValueError:
            raise InputError(f"{spec}: expected sequential:K with an integer K") from None
    return read_pairs(spec, set(names))


def write_pairs(path: str | Path, pairs: list[tuple[str, str]]) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(f"{a} {b}\n" for a, b in pairs))
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    return path
