"""Listing images (folders, globs, text lists) and reading them as gray float32 in [0,1]."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import png_bytes

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import ImageReadError, InputError
from descmatch.extract import extract
from descmatch.h5 import read_features
from descmatch.images import list_images, read_image, resize_max


def _touch_image(path: Path, seed: int = 0, shape: tuple[int, int] = (20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """root/ a.png, b.JPG, notes.txt, .hidden, data.npy, sub/c.jpg, sub/deeper/d.tif,
    sub/readme.md, empty/ (no files)."""
    root = tmp_path / "root"
    _touch_image(root / "a.png", 1)
    _touch_image(root / "b.JPG", 2)
    _touch_image(root / "sub" / "c.jpg", 3)
    _touch_image(root / "sub" / "deeper" / "d.tif", 4)
    (root / "notes.txt").write_text("not an image\n")
    (root / ".hidden").write_bytes(b"\0\1\2")
    np.save(root / "data.npy", np.zeros(3))
    (root / "sub" / "readme.md").write_text("# hi\n")
    (root / "empty").mkdir()
    return root


# -- listing ---------------------------------------------------------------------------------
def test_folder_is_recursive_and_ignores_other_files(tree: Path) -> None:
    il = list_images(tree)
    assert il.root == tree
    assert il.names == ["a.png", "b.JPG", "sub/c.jpg", "sub/deeper/d.tif"]
    for name in il.names:
        assert il.path(name).is_file()


def test_folder_given_as_string_with_trailing_slash(tree: Path) -> None:
    il = list_images(str(tree) + "/")
    assert il.names == ["a.png", "b.JPG", "sub/c.jpg", "sub/deeper/d.tif"]


def test_single_image(tree: Path) -> None:
    il = list_images(tree / "sub" / "c.jpg")
    assert il.root == tree / "sub"
    assert il.names == ["c.jpg"]


def test_glob_names_are_relative_to_the_fixed_prefix(tree: Path) -> None:
    il = list_images(f"{tree}/*.png")
    assert il.root == tree
    assert il.names == ["a.png"]
    il = list_images(f"{tree}/**/*.jpg")
    assert il.root == tree
    assert il.names == ["sub/c.jpg"]
    il = list_images(f"{tree}/sub/**/*")  # directories and non-images are dropped
    assert il.root == tree / "sub"
    assert il.names == ["c.jpg", "deeper/d.tif"]
    for name in il.names:
        assert il.path(name).is_file()


def test_glob_matching_nothing_names_the_pattern(tree: Path) -> None:
    pattern = f"{tree}/*.webp"
    with pytest.raises(InputError, match="pattern") as e:
        list_images(pattern)
    assert pattern in str(e.value)
    with pytest.raises(InputError):
        list_images(f"{tree}/*.txt")  # matches a file, but not an image


def test_text_list_with_relative_paths(tree: Path) -> None:
    lst = tree / "list.txt"
    lst.write_text("# my images\n\nsub/c.jpg\n  a.png  \n./sub/deeper/d.tif\n")
    il = list_images(lst)
    assert il.root == tree
    assert il.names == ["sub/c.jpg", "a.png", "sub/deeper/d.tif"]  # the list's order
    for name in il.names:
        assert il.path(name).is_file()


def test_text_list_with_absolute_paths(tree: Path, tmp_path: Path) -> None:
    other = _touch_image(tmp_path / "elsewhere" / "e.png", 5)
    lst = tmp_path / "lists" / "abs.txt"
    lst.parent.mkdir()
    lst.write_text(f"{tree / 'sub' / 'c.jpg'}\n{other}\n")
    il = list_images(lst)
    assert sorted(il.path(n).resolve() for n in il.names) == sorted(
        [(tree / "sub" / "c.jpg").resolve(), other.resolve()]
    )
    for name in il.names:
        assert not Path(name).is_absolute()
        assert il.path(name).is_file()
    assert len(set(il.names)) == 2


def test_text_list_mixing_relative_and_absolute(tree: Path) -> None:
    lst = tree / "mixed.txt"
    lst.write_text(f"a.png\n{(tree / 'sub' / 'c.jpg').resolve()}\n")
    il = list_images(lst)
    assert [il.path(n).resolve() for n in il.names] == [
        (tree / "a.png").resolve(),
        (tree / "sub" / "c.jpg").resolve(),
    ]


def test_text_list_naming_a_missing_image(tree: Path) -> None:
    lst = tree / "bad.txt"
    lst.write_text("a.png\nnope.png\n")
    with pytest.raises(InputError) as e:
        list_images(lst)
    assert str(lst) in str(e.value) and "nope.png" in str(e.value) and ":2" in str(e.value)


def test_text_list_naming_no_image(tree: Path) -> None:
    lst = tree / "only-comments.txt"
    lst.write_text("# nothing here\n\n")
    with pytest.raises(InputError, match="names no images"):
        list_images(lst)


def test_binary_non_image_file(tree: Path) -> None:
    with pytest.raises(InputError) as e:
        list_images(tree / ".hidden")
    assert str(tree / ".hidden") in str(e.value)


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    with pytest.raises(InputError) as e:
        list_images(missing)
    assert str(missing) in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_folder_names_it(tree: Path) -> None:
    with pytest.raises(InputError) as e:
        list_images(tree / "empty")
    assert str(tree / "empty") in str(e.value)


def test_folder_without_images_names_it(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("x")
    (d / "b.jpg.bak").write_text("x")
    with pytest.raises(InputError) as e:
        list_images(d)
    assert str(d) in str(e.value)


# -- reading ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gray8() -> np.ndarray:
    """A smooth gray test image with the full range, uint8 (H,W) = (48, 64)."""
    y, x = np.mgrid[0:48, 0:64].astype(np.float32)
    img = 127.5 + 127.5 * np.sin(x / 7.0) * np.cos(y / 5.0)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def test_gray_png_is_float_in_unit_range(tmp_path: Path, gray8: np.ndarray) -> None:
    p = tmp_path / "g.png"
    cv2.imwrite(str(p), gray8)
    img = read_image(p)
    assert img.dtype == np.float32 and img.shape == gray8.shape
    assert img.flags.c_contiguous
    np.testing.assert_allclose(img, gray8 / 255.0, atol=1e-6)
    assert img.min() == 0.0 and img.max() == 1.0


def test_colour_alpha_and_16bit_read_as_the_same_gray(tmp_path: Path, gray8: np.ndarray) -> None:
    ref = gray8 / 255.0
    bgr = np.repeat(gray8[..., None], 3, axis=2)
    bgra = np.concatenate([bgr, np.full_like(gray8, 77)[..., None]], axis=2)
    files = {
        "colour.png": lambda p: cv2.imwrite(str(p), bgr),
        "alpha.png": lambda p: cv2.imwrite(str(p), bgra),
        "gray16.png": lambda p: cv2.imwrite(str(p), gray8.astype(np.uint16) * 257),
        "colour16.png": lambda p: cv2.imwrite(str(p), bgr.astype(np.uint16) * 257),
        "gray.bmp": lambda p: cv2.imwrite(str(p), gray8),
        "gray.tif": lambda p: cv2.imwrite(str(p), gray8),
        "gray-alpha.png": lambda p: p.write_bytes(
            png_bytes(np.stack([gray8, np.full_like(gray8, 200)], -1), color_type=4)
        ),
        "gray-alpha16.png": lambda p: p.write_bytes(
            png_bytes(
                np.stack([gray8.astype(np.uint16) * 257, np.full(gray8.shape, 9, np.uint16)], -1),
                color_type=4,
                bit_depth=16,
            )
        ),
    }
    for name, write in files.items():
        p = tmp_path / name
        write(p)
        img = read_image(p)
        assert img.dtype == np.float32, name
        assert img.shape == gray8.shape, name
        assert 0.0 <= img.min() and img.max() <= 1.0, name
        np.testing.assert_allclose(img, ref, atol=1.5 / 255, err_msg=name)


def test_colour_is_converted_with_luma_weights(tmp_path: Path) -> None:
    # Pure blue, green and red in BGR order: gray is 0.114, 0.587, 0.299.
    img = np.zeros((4, 3, 3), np.uint8)
    for c in range(3):
        img[:, c, c] = 255
    p = tmp_path / "bgr.png"
    cv2.imwrite(str(p), img)
    g = read_image(p)
    np.testing.assert_allclose(g[0], [0.114, 0.587, 0.299], atol=2e-3)


def test_16bit_keeps_its_precision(tmp_path: Path) -> None:
    img = np.array([[0, 1000, 1001], [32768, 65534, 65535]], np.uint16)
    p = tmp_path / "deep.png"
    cv2.imwrite(str(p), img)
    g = read_image(p)
    np.testing.assert_allclose(g, img / 65535.0, rtol=0, atol=1e-7)
    assert g[0, 1] != g[0, 2]  # not quantised to 8 bits


def test_jpeg_reads_close_to_its_source(tmp_path: Path, scene: np.ndarray) -> None:
    p = tmp_path / "s.jpg"
    cv2.imwrite(str(p), scene, [cv2.IMWRITE_JPEG_QUALITY, 95])
    img = read_image(p)
    assert img.shape == scene.shape
    assert np.abs(img - scene / 255.0).mean() < 0.01


def test_truncated_jpeg_names_the_file(tmp_path: Path, scene: np.ndarray) -> None:
    ok, buf = cv2.imencode(".jpg", scene)
    data = buf.tobytes()
    for frac in (0.5, 0.95):
        p = tmp_path / f"cut{frac}.jpg"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(ImageReadError) as e:
            read_image(p)
        assert str(p) in str(e.value)


def test_truncated_png_names_the_file(tmp_path: Path, scene: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", scene)
    p = tmp_path / "cut.png"
    p.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize(
    "name,content",
    [
        ("random.jpg", np.random.default_rng(0).bytes(5000)),
        ("markers-ok.jpg", b"\xff\xd8" + np.random.default_rng(1).bytes(3000) + b"\xff\xd9"),
        ("text.png", b"this is not a png, but ends in IEND\n"),
        ("empty.png", b""),
        ("garbage.bmp", b"BM" + np.random.default_rng(2).bytes(100)),
    ],
)
def test_corrupt_file_names_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert str(p) in str(e.value)
    assert isinstance(e.value, InputError)


def test_unreadable_path_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError) as e:
        read_image(tmp_path / "missing.png")
    assert "missing.png" in str(e.value)
    with pytest.raises(ImageReadError):
        read_image(tmp_path)  # a folder


def test_jpeg_with_trailing_data_after_end_marker_is_valid(
    tmp_path: Path, scene: np.ndarray
) -> None:
    ok, buf = cv2.imencode(".jpg", scene, [cv2.IMWRITE_JPEG_QUALITY, 95])
    p = tmp_path / "motion.jpg"
    p.write_bytes(buf.tobytes() + bytes(8192))
    assert cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) is not None  # OpenCV decodes it
    assert read_image(p).shape == scene.shape


# -- tiny images and resizing ----------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (3, 200), (15, 15)])
def test_tiny_images_give_zero_keypoints(shape: tuple[int, int]) -> None:
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    kps = SiftDetector(max_keypoints=100)(img)
    assert len(kps) == 0
    assert kps.xy.shape == (0, 2) and kps.size.shape == (0,)


def test_tiny_and_flat_images_extract_to_empty_groups(tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    d.mkdir()
    cv2.imwrite(str(d / "a.png"), np.random.default_rng(0).integers(0, 256, (5, 5), np.uint8))
    cv2.imwrite(str(d / "b.png"), np.zeros((1, 1), np.uint8))
    cv2.imwrite(str(d / "c.png"), np.full((40, 40), 128, np.uint8))
    out = tmp_path / "f.h5"
    res = extract(list_images(d), out, build_describer("rootsift"), SiftDetector(max_keypoints=50))
    assert res.images == 3 and res.keypoints == 0 and not res.failed
    for name, size in [("a.png", (5, 5)), ("b.png", (1, 1)), ("c.png", (40, 40))]:
        f = read_features(out, name)
        assert f["keypoints"].shape == (0, 2)
        assert f["descriptors"].shape == (128, 0)
        assert tuple(f["image_size"]) == size


def test_resize_max_limits_the_longer_side() -> None:
    img = np.random.default_rng(0).random((300, 500)).astype(np.float32)
    small, (sx, sy) = resize_max(img, 100)
    assert small.shape == (60, 100)
    assert (sx, sy) == (100 / 500, 60 / 300)
    assert small.dtype == np.float32
    assert abs(float(small.mean()) - float(img.mean())) < 0.01  # area averaging
    same, scale = resize_max(img, 500)
    assert same is img and scale == (1.0, 1.0)
    same, scale = resize_max(img, None)
    assert same is img and scale == (1.0, 1.0)
