"""Reader for the Brown / PhotoTour patch dataset (liberty, notredame, yosemite).

Layout of one dataset folder:

* ``patchNNNN.bmp``: 1024x1024 grayscale images, each a 16x16 grid of 64x64 patches in
  row-major order. Patch ``k`` is in file ``k // 256`` at row ``(k % 256) // 16`` and column
  ``(k % 256) % 16``. The last file may be partly empty.
* ``info.txt``: one line per patch, ``point_id unused``; the number of lines is the number of
  patches.
* ``m50_NNNNN_NNNNN_0.txt``: evaluation pairs, one per line,
  ``patchID1 pointID1 unused1 patchID2 pointID2 unused2 unused3``; a pair matches when the
  two point ids are equal.
"""

from __future__ import annotations

import re
from itertools import chain
from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError, InputError

GRID = 16
"""Patches per row and per column of one bmp."""
PATCHES_PER_FILE = GRID * GRID
SOURCE_SIZE = 64
"""Side of a patch as stored in the bmps."""
SUPPORTED_SIZES = (32, 64)

_M50_RE = re.compile(r"^m50_(\d+)_(\d+)_(\d+)\.txt$")


def bmp_name(index: int) -> str:
    """File name of the ``index``-th grid image: ``patch0000.bmp``, ``patch0001.bmp``, ..."""
    return f"patch{index:04d}.bmp"


def _read_int_table(path: Path, columns: int) -> np.ndarray:
    """Whitespace-separated integer table with exactly ``columns`` fields per non-empty line.

    Shape: -> (L, columns) int64. Raises InputError naming the file (and line) if it cannot be
    read or a line is malformed.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    rows = [line.split() for line in text.splitlines()]
    numbered = [(i + 1, r) for i, r in enumerate(rows) if r]
    for lineno, fields in numbered:
        if len(fields) != columns:
            raise InputError(
                f"{path}:{lineno}: malformed line, expected {columns} integers, "
                f"got {len(fields)} field(s)"
            )
    flat = list(chain.from_iterable(r for _, r in numbered))
    try:
        values = np.array(flat, dtype=np.int64)
    except (ValueError, OverflowError):
        for lineno, fields in numbered:
            try:
                [int(f) for f in fields]
            except ValueError:
                raise InputError(
                    f"{path}:{lineno}: malformed line, expected {columns} integers: "
                    f"{' '.join(fields)!r}"
                ) from None
        raise InputError(f"{path}: malformed, expected integers") from None
    return values.reshape(-1, columns)


def _grid_to_patches(img: np.ndarray, size: int) -> np.ndarray:
    """Slice a (16*size, 16*size) grid image into its patches, row-major.

    Shape: (16*S, 16*S) -> (256, S, S).
    """
    return img.reshape(GRID, size, GRID, size).transpose(0, 2, 1, 3).reshape(-1, size, size)


class BrownDataset:
    """All patches of one Brown/PhotoTour dataset folder, in memory.

    ``patches``: (M, patch_size, patch_size) uint8; ``point_ids``: (M,) int64, the 3D point of
    each patch. With ``patch_size=32`` the 64-px patches are shrunk with area averaging
    (cv2.INTER_AREA, i.e. the mean of each 2x2 block); with 64 they are kept as stored.
    ``max_patches`` keeps only the first patches (for quick runs); pairs that refer to a dropped
    patch are then left out by :meth:`pairs`.
    """

    def __init__(self, root: Path, patch_size: int = 32, max_patches: int | None = None) -> None:
        root = Path(root)
        if patch_size not in SUPPORTED_SIZES:
            raise ConfigError(
                f"Brown dataset: unsupported patch_size {patch_size}; "
                f"choose one of {', '.join(map(str, SUPPORTED_SIZES))}"
            )
        if max_patches is not None and max_patches < 0:
            raise ConfigError(f"Brown dataset: max_patches must be >= 0, got {max_patches}")
        if not root.is_dir():
            raise InputError(f"{root}: Brown dataset folder not found")
        self.root = root
        self.name = root.name
        self.patch_size = patch_size

        info_path = root / "info.txt"
        if not info_path.is_file():
            raise InputError(f"{info_path}: missing (a Brown dataset needs info.txt)")
        info = _read_int_table(info_path, 2)
        self.num_total = len(info)
        """Number of patches the dataset has (info.txt lines), before ``max_patches``."""
        count = self.num_total if max_patches is None else min(self.num_total, max_patches)
        self.point_ids: np.ndarray = np.ascontiguousarray(info[:count, 0])
        self.patches: np.ndarray = self._load_patches(count)

    def _load_patches(self, count: int) -> np.ndarray:
        size = self.patch_size
        out = np.empty((count, size, size), dtype=np.uint8)
        num_files = -(-count // PATCHES_PER_FILE)
        for f in range(num_files):
            path = self.root / bmp_name(f)
            if not path.is_file():
                raise InputError(
                    f"{path}: missing; info.txt lists {self.num_total} patches, which need "
                    f"{-(-self.num_total // PATCHES_PER_FILE)} bmp file(s)"
                )
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if img is None:
                raise InputError(f"{path}: cannot decode the image")
            side = GRID * SOURCE_SIZE
            if img.shape != (side, side):
                raise InputError(
                    f"{path}: expected a {side}x{side} patch grid, got "
                    f"{img.shape[1]}x{img.shape[0]}"
                )
            if size != SOURCE_SIZE:
                # Patch borders fall on multiples of the integer shrink factor, so shrinking the
                # whole grid with area averaging never mixes pixels of neighbouring patches.
                img = cv2.resize(img, (GRID * size, GRID * size), interpolation=cv2.INTER_AREA)
            start = f * PATCHES_PER_FILE
            stop = min(start + PATCHES_PER_FILE, count)
            out[start:stop] = _grid_to_patches(img, size)[: stop - start]
        return out

    def __len__(self) -> int:
        return len(self.patches)

    def __repr__(self) -> str:
        return (
            f"BrownDataset({self.name!r}, patches={len(self)}, patch_size={self.patch_size}, "
            f"points={len(np.unique(self.point_ids))})"
        )

    def pair_files(self) -> list[str]:
        """Names of the ``m50_*.txt`` pair files in the folder, largest first."""

        def key(p: Path) -> tuple[int, str]:
            m = _M50_RE.match(p.name)
            return (int(m.group(1)) if m else -1, p.name)

        files = sorted(self.root.glob("m50_*.txt"), key=key, reverse=True)
        return [p.name for p in files]

    def pairs(self, name: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Evaluation pairs of an m50 file: the largest one by default, or the named one.

        ``name`` may be given with or without ``.txt``. Returns ``(idx0, idx1, is_match)``:
        (L,) int64 patch indices and (L,) bool.
        """
        if name is None:
            names = self.pair_files()
            if not names:
                raise InputError(f"{self.root}: no m50_*.txt pairs file")
            path = self.root / names[0]
        else:
            path = self.root / (name if name.endswith(".txt") else f"{name}.txt")
            if not path.is_file():
                available = ", ".join(self.pair_files()) or "none"
                raise InputError(f"{path}: pairs file not found (available: {available})")
        table = _read_int_table(path, 7)
        idx0, idx1 = table[:, 0], table[:, 3]
        is_match = table[:, 1] == table[:, 4]
        if len(table) and (min(idx0.min(), idx1.min()) < 0):
            raise InputError(f"{path}: negative patch index")
        in_range = (idx0 < len(self)) & (idx1 < len(self))
        if not in_range.all():
            if len(self) == self.num_total:
                bad = int(max(idx0.max(), idx1.max()))
                raise InputError(
                    f"{path}: refers to patch {bad}, but the dataset has {self.num_total}"
                )
            idx0, idx1, is_match = idx0[in_range], idx1[in_range], is_match[in_range]
        return (
            np.ascontiguousarray(idx0),
            np.ascontiguousarray(idx1),
            np.ascontiguousarray(is_match),
        )
