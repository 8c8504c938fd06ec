"""Match pictures: two images side by side, RANSAC inliers in green, outliers in red."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..errors import ConfigError, OutputError

GEOMETRIES = ("fundamental", "homography")
INLIER = (80, 220, 80)  # BGR
OUTLIER = (60, 60, 230)


def verify(
    xy0: np.ndarray, xy1: np.ndarray, geometry: str = "fundamental", threshold: float = 3.0
) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC (MAGSAC++) on matched points. Returns the model and an inlier mask.

    Shape: xy0, xy1 (M,2) -> model (3,3) or None, mask (M,) bool.
    """
    if geometry not in GEOMETRIES:
        raise ConfigError(f"--geometry {geometry}: choose one of {', '.join(GEOMETRIES)}")
    need = 8 if geometry == "fundamental" else 4
    mask = np.zeros(len(xy0), bool)
    if len(xy0) < need:
        return None, mask
    a, b = xy0.astype(np.float64), xy1.astype(np.float64)
    if geometry == "homography":
        model, m = cv2.findHomography(
            a, b, cv2.USAC_MAGSAC, threshold, confidence=0.9999, maxIters=10000
        )
    else:
        model, m = cv2.findFundamentalMat(a, b, cv2.USAC_MAGSAC, threshold, 0.9999, 10000)
        if model is not None and model.shape != (3, 3):
            model = model[:3]
    if model is None or m is None:
        return None, mask
    return model, m.ravel().astype(bool)


def draw_matches(
    img0: np.ndarray,
    img1: np.ndarray,
    xy0: np.ndarray,
    xy1: np.ndarray,
    inliers: np.ndarray,
    max_side: int = 1600,
    max_lines: int = 500,
) -> np.ndarray:
    """Draw both images side by side with lines between matches (at most ``max_lines``,
    an even sample, so dense matches stay readable). Shape: gray (H,W) [0,1]."""

    def to_bgr(img: np.ndarray) -> np.ndarray:
        u8 = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
        return cv2.cvtColor(u8, cv2.COLOR_GRAY2BGR)

    h = max(img0.shape[0], img1.shape[0])
    w = img0.shape[1] + img1.shape[1]
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[: img0.shape[0], : img0.shape[1]] = to_bgr(img0)
    canvas[: img1.shape[0], img0.shape[1] :] = to_bgr(img1)
    s = min(1.0, max_side / max(h, w))
    if s < 1.0:
        canvas = cv2.resize(canvas, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    shift = 4  # sub-pixel line drawing
    p0 = np.round(xy0 * s * (1 << shift)).astype(np.int64)
    p1 = np.round((xy1 + [img0.shape[1], 0]) * s * (1 << shift)).astype(np.int64)
    order = np.argsort(inliers, kind="stable")  # outliers first, inliers drawn on top
    if len(order) > max_lines:
        keep = np.random.default_rng(0).choice(len(order), max_lines, replace=False)
        order = order[np.sort(keep)]
    for i in order:
        c = INLIER if inliers[i] else OUTLIER
        a, b = (int(p0[i, 0]), int(p0[i, 1])), (int(p1[i, 0]), int(p1[i, 1]))
        cv2.line(canvas, a, b, c, 1, cv2.LINE_AA, shift)
        cv2.circle(canvas, a, 2 << shift, c, 1, cv2.LINE_AA, shift)
        cv2.circle(canvas, b, 2 << shift, c, 1, cv2.LINE_AA, shift)
    n_in = int(inliers.sum())
    label = f"{len(inliers)} matches, {n_in} inliers"
    org = (10, canvas.shape[0] - 12)
    for color, thick in (((0, 0, 0), 4), ((255, 255, 255), 1)):
        cv2.putText(canvas, label, org, cv2.FONT_HERSHEY_SIMPLEX, 0.8, color, thick, cv2.LINE_AA)
    return canvas


def check_image_output(path: str | Path) -> None:
    """OutputError, before any work, unless OpenCV can encode ``path``'s extension and a
    file can be made there."""
    from ..outputs import check_writable

    path = Path(path)
    if not path.suffix or not cv2.haveImageWriter(str(path)):
        raise OutputError(f"{path}: not a picture format OpenCV writes (use .png or .jpg)")
    check_writable(path, "picture")


def write_image(path: str | Path, img: np.ndarray) -> Path:
    """Encode and write a picture; OutputError (one line) when it cannot be."""
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".png", img)
    except cv2.error:
        ok = False
    if not ok:
        raise OutputError(f"{path}: cannot encode an image with this extension (use .png or .jpg)")
    try:
        path.write_bytes(buf.tobytes())
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror})") from None
    return path
