"""Rendered multi-view scenes with known cameras for the structure-from-motion tests: a room
corner (two textured walls and a textured floor) seen by cameras on an arc, written as
``images/`` plus ``cameras.txt`` (the format of ``descmatch.cameras``)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from descmatch.cameras import Camera
from descmatch.examples import render_scene

WIDTH, HEIGHT, FOCAL = 400, 300, 330.0
TEX = 384  # texture pixels per plane side
SIDE = 2.0  # plane side in world units


def look_at(center: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R, t of a camera at ``center`` looking at ``target``; world y points down."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(np.array([0.0, 1.0, 0.0]), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    r = np.stack([x, y, z])
    return r, -r @ center


def _planes() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Two walls of a room corner and its floor: origin, and the world vectors of one texture
    pixel along the texture's x and y (y down; the floor is at y = +1)."""
    top = np.array([0.0, -1.0, 0.0])
    down = np.array([0.0, 1.0, 0.0]) * SIDE / TEX
    left = np.array([-1.0, 0.0, -1.0]) / np.sqrt(2)
    right = np.array([1.0, 0.0, -1.0]) / np.sqrt(2)
    floor_origin = np.array([0.0, 1.0, 0.0]) + left * SIDE
    return [
        (floor_origin, -left * SIDE / TEX, right * SIDE / TEX),  # the floor, drawn first
        (top + left * SIDE, -left * SIDE / TEX, down),
        (top, right * SIDE / TEX, down),
    ]


def render(cam: Camera, textures: list[np.ndarray]) -> np.ndarray:
    """The planes as seen by ``cam`` (painter's order: the floor first). Shape: (H,W) uint8."""
    img = np.full((cam.height, cam.width), 0.1, np.float32)
    for (origin, u, v), tex in zip(_planes(), textures, strict=True):
        h = cam.K @ np.stack([cam.R @ u, cam.R @ v, cam.R @ origin + cam.t], 1)
        warped = cv2.warpPerspective(tex, h, (cam.width, cam.height), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        mask = cv2.warpPerspective(np.ones_like(tex), h, (cam.width, cam.height),
                                   flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        img = img * (1 - mask) + warped
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def make_scene(folder: Path, num_views: int = 6, seed: int = 0, arc: float = 24.0,
               prefix: str = "v") -> list[Camera]:
    """Render the corner into ``num_views`` cameras on an arc of +-``arc`` degrees and write
    ``folder/images/`` and ``folder/cameras.txt``. Returns the cameras."""
    textures = [cv2.GaussianBlur(render_scene(TEX, TEX, seed=seed + i).astype(np.float32)
                                 / 255.0, (0, 0), 0.7) for i in range(3)]
    k = np.array([[FOCAL, 0, (WIDTH - 1) / 2], [0, FOCAL, (HEIGHT - 1) / 2], [0, 0, 1]])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cams = []
    lines = ["# name width height fx fy cx cy r11 r12 r13 r21 r22 r23 r31 r32 r33 tx ty tz"]
    for i, az in enumerate(np.linspace(-arc, arc, num_views)):
        a = np.radians(az)
        center = np.array([3.6 * np.sin(a), -0.2 + 0.25 * (-1) ** i, -3.6 * np.cos(a)])
        r, t = look_at(center, np.array([0.0, 0.2, -0.7]))
        cam = Camera(f"{prefix}{i}.png", WIDTH, HEIGHT, k, r, t)
        cv2.imwrite(str(folder / "images" / cam.name), render(cam, textures))
        cams.append(cam)
        vals = [k[0, 0], k[1, 1], k[0, 2], k[1, 2], *r.ravel(), *t]
        lines.append(f"{cam.name} {WIDTH} {HEIGHT} " + " ".join(f"{v:.10g}" for v in vals))
    (folder / "cameras.txt").write_text("\n".join(lines) + "\n")
    return cams
