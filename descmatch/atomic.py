"""Atomic file writes: write under a temporary name beside the target, then rename over it, so
a reader (or a crash) never sees half a file.

The temporary name keeps the target's suffix (``pairs.npy`` -> ``pairs.npy.tmp.npy``), because
``numpy.save`` and ``numpy.savez`` append their suffix to names without one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def temporary_path(path: str | Path) -> Path:
    """The name :func:`atomic_write` writes ``path`` under before the rename."""
    p = Path(path)
    return p.with_name(p.name + ".tmp" + p.suffix)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to write the file, then rename ``tmp`` over ``path``.

    If ``write`` fails, the temporary file is removed and ``path`` is left as it was.
    """
    p = Path(path)
    tmp = temporary_path(p)
    try:
        write(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return p


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_npy(path: str | Path, array: np.ndarray) -> Path:
    """``numpy.save`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: np.save(tmp, array))


def atomic_savez(path: str | Path, *, compressed: bool = False, **arrays: Any) -> Path:
    """``numpy.savez`` (or ``savez_compressed``) of the named ``arrays`` to ``path``
    atomically."""
    if compressed:
        return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
