"""Listing and reading images: folders (recursive), globs and text files of paths.

Images are read as grayscale float32 in [0,1], whatever their depth (8/16-bit), channels
(gray, colour, alpha) or format. EXIF orientation is ignored: pixels are used as stored.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageReadError, InputError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".pbm",
    ".tif",
    ".tiff",
    ".bmp",
    ".webp",
)
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class ImageList:
    """Images to process: ``root / name`` is each file; names are the HDF5 group keys."""

    root: Path
    names: list[str]

    def path(self, name: str) -> Path:
        return self.root / name


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(spec: str | Path) -> ImageList:
    """Resolve a folder (recursive), a glob pattern, a text file of paths, or a single image.

    Names are POSIX paths relative to the folder, the glob's fixed prefix, or the list file's
    folder. Non-image files in folders are ignored. Raises InputError when nothing is found.
    """
    spec_str = str(spec)
    path = Path(spec_str)
    if any(c in spec_str for c in _GLOB_CHARS) and not path.exists():
        parts = Path(spec_str).parts
        fixed = []
        for part in parts:
            if any(c in part for c in _GLOB_CHARS):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        files = sorted(Path(p) for p in glob.glob(spec_str, recursive=True))
        files = [p for p in files if p.is_file() and is_image(p)]
        if not files:
            raise InputError(f"{spec_str}: the pattern matches no image files")
        return ImageList(root, [p.relative_to(root).as_posix() for p in files])
    if not path.exists():
        raise InputError(f"{spec_str}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_image(p))
        if not files:
            raise InputError(
                f"{spec_str}: folder holds no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
            )
        return ImageList(path, [p.relative_to(path).as_posix() for p in files])
    if is_image(path):
        return ImageList(path.parent, [path.name])
    # A text file listing image paths, one per line (relative to the list's folder).
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{spec_str}: not an image, folder, glob or text list of paths") from None
    base = path.parent
    files: list[Path] = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        full = base / line  # an absolute line stays absolute
        if not full.is_file():
            raise InputError(f"{spec_str}:{i}: listed image {line} does not exist")
        files.append(full)
    if not files:
        raise InputError(f"{spec_str}: the list names no images")
    if all(not Path(f).is_absolute() for f in (ln.strip() for ln in lines if ln.strip())):
        return ImageList(base, [f.relative_to(base).as_posix() for f in files])
    resolved = [f.resolve() for f in files]
    root = Path(os.path.commonpath([f.parent for f in resolved]))
    return ImageList(root, [f.relative_to(root).as_posix() for f in resolved])


def _check_complete(path: Path, data: bytes) -> None:
    """Catch truncated JPEG and PNG files, which OpenCV decodes silently with grey filler.

    JPEG: an end-of-image marker must follow the last start-of-scan (byte stuffing keeps it
    out of the compressed data); trailing data after it (motion photos) is fine.
    PNG: an IEND chunk must follow the first IDAT chunk.
    """
    suffix = path.suffix.lower()
    if suffix in (".jpg", ".jpeg"):
        sos = data.rfind(b"\xff\xda")
        if data.rfind(b"\xff\xd9") < sos or (sos < 0 and b"\xff\xd9" not in data):
            raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker)")
    elif suffix == ".png" and data.rfind(b"IEND") < data.find(b"IDAT"):
        raise ImageReadError(f"{path}: truncated PNG (no IEND chunk)")


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported image as grayscale float32 in [0,1].

    Shape: (H,W) float32. Raises ImageReadError for unreadable, corrupt or truncated files.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise ImageReadError(f"{path}: empty file")
    _check_complete(path, data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.size == 0:
        raise ImageReadError(f"{path}: not a decodable image (corrupt or unsupported format)")
    return to_gray_float(img)


def to_gray_float(img: np.ndarray) -> np.ndarray:
    """Convert a decoded image (any depth, 1/3/4 channels, BGR order) to gray float32 [0,1]."""
    if img.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif img.dtype == np.uint16:
        scale = 1.0 / 65535.0
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        info = np.iinfo(img.dtype)
        scale = 1.0 / float(info.max)
    img = img.astype(np.float32) * np.float32(scale)
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[2] == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        else:
            img = img[:, :, 0]
    return np.ascontiguousarray(np.clip(img, 0.0, 1.0))


def resize_max(img: np.ndarray, max_side: int | None) -> tuple[np.ndarray, tuple[float, float]]:
    """Downscale so the longer side is at most ``max_side`` (area averaging).

    Returns the image and the (x, y) scale factors from original to resized pixels.
    """
    h, w = img.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return img, (1.0, 1.0)
    s = max_side / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    out = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out, (nw / w, nh / h)
