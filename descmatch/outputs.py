"""Checks of output locations, made before any work: the folder exists and takes a new file,
the path is not a folder, and no output is one of the run's inputs."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputError


def _key(path: Path) -> Path:
    """The file a path names, links and '..' resolved (the path itself where it cannot be)."""
    try:
        return Path(os.path.realpath(path))
    except OSError:
        return path.absolute()


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the same inode when both exist)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return _key(a) == _key(b)


def refuse_inputs(output: str | Path, inputs: Iterable[str | Path], what: str = "output") -> None:
    """OutputError when ``output`` is one of ``inputs`` (writing it would destroy an input)."""
    output = Path(output)
    key = _key(output)
    exists = output.exists()
    for p in inputs:
        p = Path(p)
        if _key(p) == key or (exists and p.exists() and same_file(p, output)):
            raise OutputError(f"{output}: the {what} is also an input ({p}); write to another file")


def check_writable(path: str | Path, what: str = "output") -> None:
    """OutputError unless a file can be created at ``path``: its folder exists and takes a
    new file (tried for real: permissions, read-only or pseudo file systems), and ``path``
    is not a folder."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: the {what} is a folder, not a file")
    if not parent.exists():
        raise OutputError(f"{path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
    except OSError as e:
        raise OutputError(
            f"{path}: folder {parent} does not take new files ({e.strerror or e})"
        ) from None
    os.close(fd)
    os.unlink(probe)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: the {what} exists and is not writable")


def check_folder(folder: str | Path) -> Path:
    """Make an output folder (and its parents); OutputError, one line, when it cannot be."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{folder}: cannot make this folder ({e.strerror or e})") from None
    check_writable(folder / ".descmatch-probe", "output folder")
    return folder
