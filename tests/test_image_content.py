"""Images are judged by their content, decoder warnings make an image corrupt, the size is
read from the header before decoding (--max-pixels), and EXIF orientation is ignored."""

from __future__ import annotations

import logging
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import MainResult, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from descmatch import cli
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import ImageReadError
from descmatch.examples import render_scene
from descmatch.extract import extract
from descmatch.h5 import read_features
from descmatch.images import (
    IMAGE_EXTENSIONS,
    list_images,
    parse_max_pixels,
    read_image,
    read_scaled,
    sniff_format,
)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return render_scene(400, 300, seed=3)


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def corrupt_scan(data: bytes) -> bytes:
    """Overwrite 300 bytes in the middle of the entropy-coded data (no 0xFF, so no marker
    appears): the end-of-image marker stays, libjpeg decodes it with a warning."""
    out = bytearray(data)
    sos = data.rfind(b"\xff\xda")
    mid = sos + (len(data) - sos) // 2
    out[mid : mid + 300] = bytes((37 * i + 11) % 255 for i in range(300))
    return bytes(out)


# -- content, not extension ------------------------------------------------------------------
def test_png_named_jpg_reads_as_the_png_it_is(tmp_path: Path, scene: np.ndarray) -> None:
    p = tmp_path / "actually-a-png.jpg"
    p.write_bytes(cv2.imencode(".png", scene)[1].tobytes())
    np.testing.assert_allclose(read_image(p), scene / 255.0, rtol=0, atol=1e-6)
    assert list_images(p).names == [p.name]


def test_jpeg_named_png_and_no_extension(tmp_path: Path, scene: np.ndarray) -> None:
    data = jpeg(scene)
    (tmp_path / "ref.jpg").write_bytes(data)
    ref = read_image(tmp_path / "ref.jpg")
    for name in ("a-jpeg.png", "no-extension"):
        p = tmp_path / name
        p.write_bytes(data)
        np.testing.assert_array_equal(read_image(p), ref)
    # A file named directly is an image by its content, even without an image extension.
    assert list_images(tmp_path / "no-extension").names == ["no-extension"]


@pytest.mark.parametrize(
    "content,what",
    [
        (b"hello, this is a text file\nsecond line\n", "not an image (its content is text)"),
        (bytes(range(256)) * 4, "not an image (its content is no image format known"),
    ],
)
def test_not_an_image_named_jpg_says_so(tmp_path: Path, content: bytes, what: str) -> None:
    p = tmp_path / "x.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {what}") and "truncated" not in msg and "JPEG" not in msg[:60]


def test_cli_reports_a_text_file_named_jpg_as_not_an_image(
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    cv2.imwrite(str(d / "ok.png"), render_scene(120, 90, seed=1))
    (d / "notes.jpg").write_text("shopping list\n")
    code, out, err = call_main("extract", str(d), str(tmp_path / "f.h5"), "-m", "rootsift")
    assert code == 0
    assert "notes.jpg: not an image (its content is text)" in out + err
    assert "truncated" not in out + err


# -- decoder warnings ------------------------------------------------------------------------
def test_corrupt_scan_data_is_corrupt_and_prints_nothing(
    tmp_path: Path, scene: np.ndarray, capfd: pytest.CaptureFixture[str]
) -> None:
    bad = corrupt_scan(jpeg(scene))
    assert bad.endswith(b"\xff\xd9")
    # The premise: OpenCV decodes it silently to an image, and libjpeg writes to fd 2.
    assert cv2.imdecode(np.frombuffer(bad, np.uint8), cv2.IMREAD_UNCHANGED) is not None
    assert "Corrupt JPEG data" in capfd.readouterr().err
    p = tmp_path / "scan.jpg"
    p.write_bytes(bad)
    with pytest.raises(ImageReadError, match="corrupt JPEG") as e:
        read_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ImageReadError):
        read_scaled(p, max_side=100)
    assert capfd.readouterr().err == ""  # no raw libjpeg text


def _main_fd(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], *args: str
) -> MainResult:
    """The console entry point in-process, with output captured at the file descriptors (so
    whatever C libraries write to fd 2 is seen too)."""
    monkeypatch.setattr(sys, "argv", ["descmatch", *args])
    capfd.readouterr()
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capfd.readouterr()
    return code, out.out, out.err


def test_corrupt_jpeg_is_skipped_and_listed_or_fatal_with_strict(
    tmp_path: Path,
    scene: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "good.jpg").write_bytes(jpeg(scene))
    (d / "bad.jpg").write_bytes(corrupt_scan(jpeg(render_scene(400, 300, seed=4))))
    out = tmp_path / "f.h5"
    code, o, err = _main_fd(
        monkeypatch, capfd, "extract", str(d), str(out), "-m", "rootsift", "--max-keypoints", "100"
    )
    assert code == 0, err
    assert "skipped bad.jpg" in o + err and "corrupt JPEG" in o + err
    raw = [ln for ln in (o + err).splitlines() if "Corrupt JPEG" in ln and "bad.jpg" not in ln]
    assert not raw, err  # libjpeg's own line never reaches the terminal
    assert read_features(out, "good.jpg")["keypoints"].shape[0] > 0
    code, o, err = _main_fd(
        monkeypatch, capfd, "extract", str(d), str(tmp_path / "g.h5"), "-m", "rootsift", "--strict"
    )
    assert code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "bad.jpg: corrupt JPEG" in errors[0]
    assert "Traceback" not in err


def test_truncated_jpeg_still_says_truncated(tmp_path: Path, scene: np.ndarray) -> None:
    data = jpeg(scene)
    p = tmp_path / "cut.jpeg"
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(p)


_PREFIXES = [b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"BM", b"P5\n"]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(prefix=st.sampled_from(_PREFIXES), body=st.binary(max_size=600))
def test_any_bytes_give_an_image_or_one_clear_error(
    prefix: bytes, body: bytes, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "fuzz.jpg"
    p.write_bytes(prefix + body)
    try:
        img = read_image(p)
    except ImageReadError as e:
        assert str(e).startswith(f"{p}: ") and "\n" not in str(e)
    else:
        assert img.dtype == np.float32 and img.ndim == 2
        assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert capfd.readouterr().err == ""


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    fmt=st.sampled_from([".png", ".bmp", ".tif", ".pgm"]),
    name_ext=st.sampled_from([*IMAGE_EXTENSIONS, ".dat", ""]),
)
def test_lossless_images_read_exactly_whatever_their_name(
    h: int, w: int, seed: int, fmt: str, name_ext: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    ok, buf = cv2.imencode(fmt, arr)
    assert ok
    p = tmp_path_factory.mktemp("lossless") / f"img{name_ext}"
    p.write_bytes(buf.tobytes())
    assert sniff_format(buf.tobytes()) is not None
    np.testing.assert_allclose(read_image(p), arr / 255.0, rtol=0, atol=1e-6)


# -- memory guard ----------------------------------------------------------------------------
def test_large_jpeg_is_read_smaller_in_its_own_coordinates(
    tmp_path: Path, scene: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    p = tmp_path / "big.jpg"
    p.write_bytes(jpeg(scene))
    with caplog.at_level(logging.WARNING, logger="descmatch.images"):
        s = read_scaled(p, max_pixels=40_000)  # 400x300 = 120,000 pixels
    assert s.image.shape == (150, 200) and s.size == (400, 300) and s.scale == (0.5, 0.5)
    assert "--max-pixels" in caplog.text and "--resize-max" in caplog.text
    ref = cv2.imdecode(np.frombuffer(jpeg(scene), np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_2)
    assert np.abs(s.image - ref / 255.0).mean() < 1.5 / 255  # libjpeg's DCT scaling
    s = read_scaled(p, max_pixels=2_000)  # 1/8: 50x38
    assert s.image.shape == (38, 50)
    s = read_scaled(p, max_side=120, max_pixels=40_000)  # then --resize-max
    assert s.image.shape == (90, 120) and s.scale == (120 / 400, 90 / 300)
    assert read_scaled(p, max_pixels=None).image.shape == (300, 400)


def test_large_png_is_read_smaller(tmp_path: Path, scene: np.ndarray) -> None:
    p = tmp_path / "big.png"
    cv2.imwrite(str(p), scene)
    s = read_scaled(p, max_pixels=40_000)
    assert s.image.shape == (150, 200) and s.size == (400, 300)
    area = cv2.resize(scene, (200, 150), interpolation=cv2.INTER_AREA)
    assert np.abs(s.image - area / 255.0).max() <= 1 / 255 + 1e-6


def test_too_large_even_at_one_eighth_is_refused(tmp_path: Path, scene: np.ndarray) -> None:
    p = tmp_path / "huge.jpg"
    p.write_bytes(jpeg(scene))
    with pytest.raises(ImageReadError, match="1/8") as e:
        read_scaled(p, max_pixels=1_000)
    assert "--max-pixels" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(ImageReadError, match="--max-pixels"):
        read_image(p, max_pixels=40_000)  # full size asked for: refused, never shrunk


def _sof_with_size(data: bytes, width: int, height: int) -> bytes:
    i = data.find(b"\xff\xc0")
    assert i > 0
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def _png_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_header_size_is_checked_before_decoding(
    tmp_path: Path, scene: np.ndarray, kind: str
) -> None:
    """A header that claims 60000x60000 (3.6 gigapixels) is refused from the header alone,
    instantly, at the default limit: nothing of that size is ever allocated."""
    p = tmp_path / f"bomb.{kind}"
    p.write_bytes(
        _sof_with_size(jpeg(scene), 60000, 60000) if kind == "jpeg" else _png_claiming(60000, 60000)
    )
    for read in (read_image, read_scaled):
        with pytest.raises(ImageReadError, match="60000x60000") as e:
            read(p)
        assert "--max-pixels" in str(e.value)


def test_extract_with_a_pixel_limit_keeps_original_coordinates(
    tmp_path: Path, scene: np.ndarray
) -> None:
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "s.jpg").write_bytes(jpeg(scene, 95))
    det, desc = SiftDetector(max_keypoints=300), build_describer("rootsift")
    limited = extract(list_images(d, max_pixels=40_000), tmp_path / "lim.h5", desc, det)
    resized = extract(list_images(d), tmp_path / "rs.h5", desc, det, max_side=200)
    assert limited.images == resized.images == 1 and not limited.failed
    a, b = read_features(tmp_path / "lim.h5", "s.jpg"), read_features(tmp_path / "rs.h5", "s.jpg")
    assert tuple(a["image_size"]) == (400, 300)
    assert a["keypoints"][:, 0].max() > 250  # original pixels, not the 200-wide read
    d2 = ((a["keypoints"][:, None] - b["keypoints"][None]) ** 2).sum(-1)
    assert np.median(np.sqrt(d2.min(1))) < 1.0  # the same points as --resize-max 200


def test_cli_max_pixels(
    tmp_path: Path, scene: np.ndarray, call_main: Callable[..., MainResult]
) -> None:
    p = tmp_path / "s.jpg"
    p.write_bytes(jpeg(scene))
    out = tmp_path / "f.h5"
    code, o, err = call_main("detect", str(p), str(out), "--max-pixels", "0.04M")
    assert code == 0, err
    assert tuple(read_features(out, "s.jpg")["image_size"]) == (400, 300)
    assert "--max-pixels" in err
    code, o, err = call_main("extract", str(p), str(tmp_path / "g.h5"), "--max-pixels", "lots")
    assert code == 2 and "--max-pixels lots" in err and "Traceback" not in err
    assert not (tmp_path / "g.h5").exists()


def test_parse_max_pixels() -> None:
    assert parse_max_pixels("50M") == parse_max_pixels("50mp") == 50_000_000
    assert parse_max_pixels("12000000") == 12_000_000
    assert parse_max_pixels("none") is None and parse_max_pixels("0") is None
    for bad in ("-5", "x", "1e400", "0.5"):
        with pytest.raises(Exception, match="--max-pixels"):
            parse_max_pixels(bad)


# -- EXIF orientation: ignored ---------------------------------------------------------------
def _with_exif_orientation(data: bytes, orientation: int) -> bytes:
    ifd = struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + tiff
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + data[2:]


def test_exif_orientation_is_ignored(tmp_path: Path) -> None:
    img = render_scene(160, 90, seed=2)  # landscape
    p = tmp_path / "rotated.jpg"
    p.write_bytes(_with_exif_orientation(jpeg(img, 95), 6))  # "rotate 90 degrees to view"
    # The premise: the tag is effective (OpenCV's default reading applies it).
    assert cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).shape == (160, 90)
    g = read_image(p)
    assert g.shape == (90, 160)  # pixels as stored
    np.testing.assert_allclose(g, read_image(_plain(tmp_path, img)), atol=1e-6)


def _plain(tmp_path: Path, img: np.ndarray) -> Path:
    p = tmp_path / "plain.jpg"
    p.write_bytes(jpeg(img, 95))
    return p


def test_png_gray_alpha_named_jpg(tmp_path: Path) -> None:
    """A hand-written PNG (gray + alpha) under a JPEG name."""
    arr = np.stack(
        [np.arange(20 * 30, dtype=np.uint8).reshape(20, 30), np.full((20, 30), 9, np.uint8)], -1
    )
    p = tmp_path / "ga.jpeg"
    p.write_bytes(png_bytes(arr, color_type=4))
    np.testing.assert_allclose(read_image(p), arr[..., 0] / 255.0, rtol=0, atol=1e-6)
