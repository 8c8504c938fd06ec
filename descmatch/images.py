"""Listing and reading images: folders (recursive), globs and text files of paths.

Images are read as grayscale float32 in [0,1], whatever their depth (8/16-bit), channels
(gray, colour, alpha) or format. A file is judged by its content, never by its name (folders
and globs pick files by extension; what is read is then decoded as what it is). JPEGs are
decoded strictly by libjpeg-turbo: a decoder warning (corrupt scan data) makes the image
corrupt. The size is read from the header before decoding, and an image above
``max_pixels`` is read at 1/2, 1/4 or 1/8 size. EXIF orientation is ignored: pixels are
used as stored, as COLMAP does.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, ImageReadError, InputError

log = logging.getLogger(__name__)
_opencv_silent = threading.Lock()

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

DEFAULT_MAX_PIXELS = 25_000_000
"""Images above this many pixels are read at 1/2, 1/4 or 1/8 size (``--max-pixels``).

SIFT detection needs about 240 bytes per pixel of the image it sees (its first octave doubles
the image): 25 MP keeps every common camera size at full resolution in about 6 GB, while a
12000x9000 photo is read at 3000x2250 (1.9 GB in all)."""

# Leading bytes of the formats OpenCV decodes (the names used in messages).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),
    (b"MM\x00+", "TIFF"),
    (b"BM", "BMP"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format that ``data`` starts with (JPEG, PNG, TIFF, BMP, WebP, PNM), or None.

    Judged by the leading bytes, never by a file name."""
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if len(data) > 2 and data[:1] == b"P" and data[1:2] in b"1234567" and data[2:3].isspace():
        return "PNM"
    return None


def _header_size(fmt: str | None, data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header states it, without decoding; None when not known."""
    if fmt == "JPEG":
        import simplejpeg

        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            return None
        return int(w), int(h)
    if fmt == "PNG" and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return w, h
    if fmt == "BMP" and len(data) >= 26:
        w, h = struct.unpack("<ii", data[18:26])
        return abs(w), abs(h)
    return None


def _describe_content(data: bytes) -> str:
    head = data[:4096]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and all(c.isprintable() or c.isspace() for c in text):
        return "its content is text"
    return "its content is no image format known (JPEG, PNG, TIFF, BMP, WebP, PNM)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageReadError(f"{path}: cannot read ({e.strerror})") from None
    if not data:
        raise ImageReadError(f"{path}: empty file")
    return data


def parse_max_pixels(text: str) -> int | None:
    """``--max-pixels``: a pixel count (``50000000``), megapixels (``50M``, ``50MP``,
    ``12.5mp``), or ``0`` / ``none`` for no limit. Raises ConfigError otherwise."""
    t = text.strip().lower()
    if t in ("0", "none", "off"):
        return None
    mult = 1.0
    for suffix in ("mp", "m"):
        if t.endswith(suffix):
            t, mult = t[: -len(suffix)], 1e6
            break
    try:
        value = float(t) * mult
    except ValueError:
        raise ConfigError(
            f"--max-pixels {text}: expected a pixel count, megapixels (50M) or none"
        ) from None
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"--max-pixels {text}: must be at least one pixel (or none)")
    return int(value)


@dataclass(frozen=True)
class ImageList:
    """Images to process: ``root / name`` is each file; names are the HDF5 group keys.
    ``max_pixels`` is the size above which :meth:`read` reads an image smaller."""

    root: Path
    names: list[str]
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def path(self, name: str) -> Path:
        return self.root / name

    def read(self, name: str, max_side: int | None = None) -> ScaledImage:
        """Read one image as it is described (see :func:`read_scaled`)."""
        return read_scaled(self.path(name), max_side, self.max_pixels)

    def subset(self, names: list[str]) -> ImageList:
        return ImageList(self.root, names, self.max_pixels)


def is_image(path: Path) -> bool:
    """Whether the name has an image extension (how folders and globs pick files)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _sniff_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return sniff_format(fh.read(16))
    except OSError:
        return None


def looks_like_image(path: str | Path) -> bool:
    """Whether a file the user names is an image: by its content when it exists (a PNG named
    .jpg is one, a features.h5 is not), else by its extension."""
    p = Path(path)
    if p.is_file():
        return _sniff_file(p) is not None or (is_image(p) and not _is_hdf5(p))
    return is_image(p)


def _is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def list_images(spec: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageList:
    """Resolve a folder (recursive), a glob pattern, a text file of paths, or a single image.

    Names are POSIX paths relative to the folder, the glob's fixed prefix, or the list file's
    folder. Folders and globs pick files by extension (others are ignored); a file named
    directly is an image when its content or its extension says so, else a list of paths.
    ``max_pixels`` goes with the list to :meth:`ImageList.read`. Raises InputError when
    nothing is found.
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
        return ImageList(root, [p.relative_to(root).as_posix() for p in files], max_pixels)
    if not path.exists():
        raise InputError(f"{spec_str}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_image(p))
        if not files:
            raise InputError(
                f"{spec_str}: folder holds no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})"
            )
        return ImageList(path, [p.relative_to(path).as_posix() for p in files], max_pixels)
    if is_image(path) or _sniff_file(path) is not None:  # a named file: judged by content
        return ImageList(path.parent, [path.name], max_pixels)
    # A text file listing image paths, one per line (relative to the list's folder).
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{spec_str}: not an image, folder, glob or text list of paths") from None
    base = path.parent
    listed: list[Path] = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        full = base / line  # an absolute line stays absolute
        if not full.is_file():
            raise InputError(f"{spec_str}:{i}: listed image {line} does not exist")
        listed.append(full)
    if not listed:
        raise InputError(f"{spec_str}: the list names no images")
    if all(not Path(f).is_absolute() for f in (ln.strip() for ln in lines if ln.strip())):
        return ImageList(base, [f.relative_to(base).as_posix() for f in listed], max_pixels)
    resolved = [f.resolve() for f in listed]
    root = Path(os.path.commonpath([f.parent for f in resolved]))
    return ImageList(root, [f.relative_to(root).as_posix() for f in resolved], max_pixels)


def _check_complete(path: Path, fmt: str, data: bytes) -> None:
    """Catch truncated JPEG and PNG files, which OpenCV decodes silently with grey filler.

    JPEG: an end-of-image marker must follow the last start-of-scan (byte stuffing keeps it
    out of the compressed data); trailing data after it (motion photos) is fine.
    PNG: an IEND chunk must follow the first IDAT chunk.
    """
    if fmt == "JPEG":
        sos = data.rfind(b"\xff\xda")
        if data.rfind(b"\xff\xd9") < sos or (sos < 0 and b"\xff\xd9" not in data):
            raise ImageReadError(f"{path}: truncated JPEG (no end-of-image marker)")
    elif fmt == "PNG" and data.rfind(b"IEND") < data.find(b"IDAT"):
        raise ImageReadError(f"{path}: truncated PNG (no IEND chunk)")


def _reduction(path: Path, width: int, height: int, max_pixels: int | None) -> int:
    """The power-of-two factor (1, 2, 4 or 8) that brings an image within ``max_pixels``.

    Raises ImageReadError when even 1/8 of each side is too large."""
    if not max_pixels or width * height <= max_pixels:
        return 1
    for f in (2, 4, 8):
        if -(-width // f) * -(-height // f) <= max_pixels:
            return f
    raise ImageReadError(
        f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is too large even "
        f"at 1/8 size for the {max_pixels / 1e6:g} MP limit (--max-pixels); raise the limit "
        "if memory allows, or downscale the file first"
    )


def _decode_jpeg(path: Path, data: bytes, max_pixels: int | None) -> tuple[np.ndarray, int, int]:
    """Strict libjpeg-turbo decoding: a warning (corrupt scan data, premature end) is an
    error, and nothing is printed. Above ``max_pixels`` libjpeg decodes at 1/2, 1/4 or 1/8
    scale directly (DCT scaling), so the full image never sits in memory.

    Shape: (h,w) uint8 for gray JPEGs, (h,w,3) BGR otherwise; plus the stored (width, height).
    """
    import simplejpeg

    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as e:
        raise ImageReadError(
            f"{path}: corrupt JPEG (unreadable header: {_first_line(e)})"
        ) from None
    f = _reduction(path, w, h, max_pixels)
    size = {"min_height": -(-h // f), "min_width": -(-w // f)} if f > 1 else {}
    try:
        img = simplejpeg.decode_jpeg(
            data, "GRAY" if colorspace == "Gray" else "BGR", strict=True, **size
        )
    except ValueError as e:
        raise ImageReadError(f"{path}: corrupt JPEG (libjpeg: {_first_line(e)})") from None
    return (img[:, :, 0] if img.shape[2] == 1 else img), w, h


def _decode_other(
    path: Path, fmt: str | None, data: bytes, max_pixels: int | None
) -> tuple[np.ndarray, int, int]:
    """OpenCV decoding, pixels as stored (no EXIF rotation). Sizes that the header states
    (PNG, BMP) are checked before decoding; others right after, before any conversion."""
    dims = _header_size(fmt, data)
    if dims is not None:
        _reduction(path, *dims, max_pixels)
    with _opencv_silent:  # OpenCV logs decoder complaints to stderr: our error says it
        previous = cv2.utils.logging.getLogLevel()
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        finally:
            cv2.utils.logging.setLogLevel(previous)
    if img is None or img.size == 0:
        if fmt is None:
            raise ImageReadError(f"{path}: not an image ({_describe_content(data)})")
        raise ImageReadError(f"{path}: corrupt {fmt} (cannot be decoded)")
    h, w = img.shape[:2]
    f = _reduction(path, w, h, max_pixels)
    if f > 1:
        img = cv2.resize(img, (-(-w // f), -(-h // f)), interpolation=cv2.INTER_AREA)
    return img, w, h


@dataclass(frozen=True)
class ScaledImage:
    """An image as described: ``image`` is the stored image downscaled by ``scale`` (x, y).

    Shape: image (h,w) float32 in [0,1]; size = the stored (width, height).
    """

    image: np.ndarray
    scale: tuple[float, float]
    size: tuple[int, int]


def read_scaled(
    path: str | Path,
    max_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ScaledImage:
    """Read an image judged by its content (not its name), as grayscale float32 in [0,1].

    An image above ``max_pixels`` is read at 1/2, 1/4 or 1/8 size (the first that fits) with
    a warning; then ``max_side`` bounds the longer side (area averaging). The scale factors map
    stored pixels to the returned ones. Raises ImageReadError for a file that is not an image,
    is truncated or corrupt (a decoder warning counts), or is too large even at 1/8.
    """
    path = Path(path)
    data = _read_bytes(path)
    fmt = sniff_format(data)
    if fmt is not None:
        _check_complete(path, fmt, data)
    if fmt == "JPEG":
        raw, w, h = _decode_jpeg(path, data, max_pixels)
    else:
        raw, w, h = _decode_other(path, fmt, data, max_pixels)
    if raw.shape[:2] != (h, w):
        assert max_pixels is not None
        log.warning(
            "%s: %dx%d (%.0f MP) is above the %g MP limit: read at %dx%d; keypoints stay in "
            "its own pixels (--resize-max sets the size, --max-pixels the limit)",
            path,
            w,
            h,
            w * h / 1e6,
            max_pixels / 1e6,
            raw.shape[1],
            raw.shape[0],
        )
    img, _ = resize_max(to_gray_float(raw), max_side)
    return ScaledImage(img, (img.shape[1] / w, img.shape[0] / h), (w, h))


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any supported image, judged by its content, as grayscale float32 in [0,1], at
    its stored size: an image above ``max_pixels`` is refused (:func:`read_scaled` reads it
    smaller instead).

    Shape: (H,W) float32. Raises ImageReadError for unreadable, corrupt, truncated or too
    large files.
    """
    path = Path(path)
    data = _read_bytes(path)
    fmt = sniff_format(data)
    if fmt is not None:
        _check_complete(path, fmt, data)
    dims = _header_size(fmt, data)
    if dims is not None:
        _refuse_large(path, *dims, max_pixels)
    if fmt == "JPEG":
        raw, w, h = _decode_jpeg(path, data, None)
    else:
        raw, w, h = _decode_other(path, fmt, data, None)
    _refuse_large(path, w, h, max_pixels)
    return to_gray_float(raw)


def _refuse_large(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels and width * height > max_pixels:
        raise ImageReadError(
            f"{path}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) is above the "
            f"{max_pixels / 1e6:g} MP limit for reading at full size (--max-pixels); "
            "downscale the file first, or raise the limit"
        )


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
