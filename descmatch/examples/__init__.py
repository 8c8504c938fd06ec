"""Example images made by this project: a synthetic textured scene seen in three views.

``render_scene`` paints a scene of shapes, strokes, text and multi-scale texture;
``warp_view`` shows it through a homography with a lighting change. The shipped files
(``view1.jpg`` .. ``view3.jpg`` and ``H_1_2``, ``H_1_3``: view-1 pixels to view-i pixels)
were made by ``python -m descmatch.examples`` and are also what the tests build on.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import cv2
import numpy as np

NAMES = ("view1.jpg", "view2.jpg", "view3.jpg")
HOMOGRAPHIES = ("H_1_2", "H_1_3")


def render_scene(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A textured gray scene. Shape: (H,W) uint8."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width), np.float32)
    for octave in range(5):  # multi-scale value noise
        s = 2 ** (octave + 2)
        small = rng.random((height // s + 2, width // s + 2)).astype(np.float32)
        img += cv2.resize(small, (width + 2 * s, height + 2 * s), interpolation=cv2.INTER_CUBIC)[
            s : s + height, s : s + width
        ] / (octave + 1)
    img = (img - img.min()) / (np.ptp(img) + 1e-6) * 120 + 60
    canvas = img.astype(np.uint8)
    for _ in range(60):
        c = int(rng.integers(0, 256))
        kind = rng.integers(0, 4)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if kind == 0:
            cv2.circle(canvas, (x, y), int(rng.integers(4, 40)), c, -1, cv2.LINE_AA)
        elif kind == 1:
            w, h = int(rng.integers(8, 80)), int(rng.integers(8, 80))
            cv2.rectangle(canvas, (x, y), (x + w, y + h), c, -1)
        elif kind == 2:
            pts = rng.integers(-50, 50, (int(rng.integers(3, 7)), 2)) + [x, y]
            cv2.fillPoly(canvas, [pts.astype(np.int32)], c, cv2.LINE_AA)
        else:
            x2, y2 = x + int(rng.integers(-120, 120)), y + int(rng.integers(-120, 120))
            cv2.line(canvas, (x, y), (x2, y2), c, int(rng.integers(1, 6)), cv2.LINE_AA)
    words = ["descmatch", "L2-Net", "HardNet", "SOSNet", "SIFT", "patch", "match", "CVPR"]
    for _ in range(12):
        cv2.putText(
            canvas,
            str(rng.choice(words)),
            (int(rng.integers(0, width - 100)), int(rng.integers(20, height))),
            int(rng.choice([cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX])),
            float(rng.uniform(0.5, 1.6)),
            int(rng.integers(0, 256)),
            int(rng.integers(1, 3)),
            cv2.LINE_AA,
        )
    return cv2.GaussianBlur(canvas, (0, 0), 0.7)


def view_homography(
    width: int,
    height: int,
    angle: float,
    scale: float,
    tilt: float,
    shift: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Rotation and scale about the image centre plus a perspective tilt."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    t = np.deg2rad(angle)
    a = np.array(
        [
            [scale * np.cos(t), -scale * np.sin(t), 0],
            [scale * np.sin(t), scale * np.cos(t), 0],
            [tilt / width, 0.0, 1.0],
        ]
    )
    c = np.array([[1, 0, -cx], [0, 1, -cy], [0, 0, 1]])
    back = np.array([[1, 0, cx + shift[0]], [0, 1, cy + shift[1]], [0, 0, 1]])
    return back @ a @ c


def warp_view(
    img: np.ndarray,
    h: np.ndarray,
    gain: float = 1.0,
    gamma: float = 1.0,
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """The scene seen through ``h`` with a lighting change. Shape: (H,W) uint8."""
    height, width = img.shape
    out = cv2.warpPerspective(
        img,
        h,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    f = (out.astype(np.float32) / 255.0) ** gamma * gain
    if noise:
        f += np.random.default_rng(seed).normal(0, noise, f.shape).astype(np.float32)
    return np.clip(f * 255 + 0.5, 0, 255).astype(np.uint8)


def make_views(
    width: int = 640, height: int = 480, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Three views and the homographies from view 1 to views 2 and 3."""
    base = render_scene(width, height, seed)
    h2 = view_homography(width, height, 12.0, 0.9, 0.15, (8.0, -5.0))
    h3 = view_homography(width, height, -25.0, 1.15, -0.2, (-10.0, 6.0))
    v2 = warp_view(base, h2, gain=0.9, gamma=1.1, noise=0.01, seed=seed + 1)
    v3 = warp_view(base, h3, gain=1.05, gamma=0.9, noise=0.01, seed=seed + 2)
    return [base, v2, v3], [h2, h3]


def example_dir() -> Path:
    return Path(str(resources.files(__name__)))


def copy_examples(folder: str | Path) -> list[Path]:
    """Copy the example files into ``folder`` (made if needed). OutputError, before anything
    is copied, when ``folder`` is a file or cannot be written, or holds another file of an
    example's name (never replaced)."""
    from ..errors import OutputError
    from ..outputs import check_folder

    folder = check_folder(folder)
    names = NAMES + HOMOGRAPHIES
    for name in names:
        dst, src = folder / name, example_dir() / name
        if dst.is_dir() or (dst.exists() and dst.read_bytes() != src.read_bytes()):
            raise OutputError(f"{dst}: exists and is not the example file; not replaced")
    files = []
    for name in names:
        try:
            shutil.copyfile(example_dir() / name, folder / name)
        except OSError as e:
            raise OutputError(f"{folder / name}: cannot write ({e.strerror or e})") from None
        files.append(folder / name)
    return files


def write_examples() -> None:
    """Regenerate the shipped example files (``python -m descmatch.examples``)."""
    views, hs = make_views()
    d = example_dir()
    for name, v in zip(NAMES, views, strict=True):
        cv2.imwrite(str(d / name), v, [cv2.IMWRITE_JPEG_QUALITY, 92])
    for name, h in zip(HOMOGRAPHIES, hs, strict=True):
        np.savetxt(d / name, h)
    print(f"wrote {', '.join(NAMES + HOMOGRAPHIES)} to {d}")
