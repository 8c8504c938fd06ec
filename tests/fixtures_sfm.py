"""Rendered multi-view scenes with known cameras for the structure-from-motion and multi-view
training tests: a room corner (two textured walls, and a textured floor) seen by cameras on an
arc, written as ``images/`` plus ``cameras.txt`` (the format of ``descmatch.cameras``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from descmatch.cameras import Camera
from descmatch.examples import render_scene


@dataclass(frozen=True)
class Rig:
    """A rendered room corner and the cameras on an arc that see it: image size, focal length
    (``fy`` = ``focal * fy_ratio``, principal point off the centre by ``pp_offset``), texture
    pixels per plane side, texture blur, whether the floor is drawn, background grey, the arc
    (+-``arc`` degrees at ``radius``, camera heights ``y0 +- y_jitter`` alternating) and the
    point the cameras look at."""

    width: int = 400
    height: int = 300
    focal: float = 330.0
    fy_ratio: float = 1.0
    pp_offset: tuple[float, float] = (0.0, 0.0)
    tex: int = 384
    blur: float = 0.7
    floor: bool = True
    background: float = 0.1
    arc: float = 24.0
    radius: float = 3.6
    y0: float = -0.2
    y_jitter: float = 0.25
    target: tuple[float, float, float] = (0.0, 0.2, -0.7)

    def K(self) -> np.ndarray:
        return np.array(
            [
                [self.focal, 0, (self.width - 1) / 2 + self.pp_offset[0]],
                [0, self.focal * self.fy_ratio, (self.height - 1) / 2 + self.pp_offset[1]],
                [0, 0, 1],
            ]
        )


#: The structure-from-motion scenes: walls and floor, 400x300.
SFM = Rig()
WIDTH, HEIGHT, FOCAL = SFM.width, SFM.height, SFM.focal
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


def _planes(tex: int, floor: bool) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Two walls of a room corner seen from inside (no wall hides the other) and, if
    ``floor``, its floor at y = +1 (first: drawn below the walls): origin, and the world
    vectors of one texture pixel along the texture's x (left to right on screen) and y."""
    top = np.array([0.0, -1.0, 0.0])  # the corner's top; walls are SIDE tall (y down)
    down = np.array([0.0, 1.0, 0.0]) * SIDE / tex
    left = np.array([-1.0, 0.0, -1.0]) / np.sqrt(2)
    right = np.array([1.0, 0.0, -1.0]) / np.sqrt(2)
    walls = [(top + left * SIDE, -left * SIDE / tex, down), (top, right * SIDE / tex, down)]
    if not floor:
        return walls
    floor_origin = np.array([0.0, 1.0, 0.0]) + left * SIDE
    return [(floor_origin, -left * SIDE / tex, right * SIDE / tex), *walls]


def render(cam: Camera, textures: list[np.ndarray], rig: Rig = SFM) -> np.ndarray:
    """The planes as seen by ``cam`` (painter's order). Shape: (H,W) uint8."""
    img = np.full((cam.height, cam.width), rig.background, np.float32)
    for (origin, u, v), tex in zip(_planes(rig.tex, rig.floor), textures, strict=True):
        # Texture pixel (a, b) is the world point origin + a u + b v: H = K [R u, R v, R o + t].
        h = cam.K @ np.stack([cam.R @ u, cam.R @ v, cam.R @ origin + cam.t], 1)
        warped = cv2.warpPerspective(
            tex,
            h,
            (cam.width, cam.height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        mask = cv2.warpPerspective(
            np.ones_like(tex),
            h,
            (cam.width, cam.height),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
        )
        img = img * (1 - mask) + warped
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def make_scene(
    folder: Path,
    num_views: int = 6,
    seed: int = 0,
    arc: float | None = None,
    prefix: str = "v",
    rig: Rig = SFM,
) -> list[Camera]:
    """Render the corner into ``num_views`` cameras on the rig's arc (or +-``arc`` degrees)
    and write ``folder/images/`` and ``folder/cameras.txt``. Returns the cameras."""
    n_planes = 3 if rig.floor else 2
    textures = [
        cv2.GaussianBlur(
            render_scene(rig.tex, rig.tex, seed=seed + i).astype(np.float32) / 255.0,
            (0, 0),
            rig.blur,
        )
        for i in range(n_planes)
    ]
    k = rig.K()
    arc = rig.arc if arc is None else arc
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cams = []
    lines = ["# name width height fx fy cx cy r11 r12 r13 r21 r22 r23 r31 r32 r33 tx ty tz"]
    for i, az in enumerate(np.linspace(-arc, arc, num_views)):
        a = np.radians(az)
        center = np.array(
            [rig.radius * np.sin(a), rig.y0 + rig.y_jitter * (-1) ** i, -rig.radius * np.cos(a)]
        )
        r, t = look_at(center, np.array(rig.target))
        cam = Camera(f"{prefix}{i}.png", rig.width, rig.height, k, r, t)
        cv2.imwrite(str(folder / "images" / cam.name), render(cam, textures, rig))
        cams.append(cam)
        vals = [k[0, 0], k[1, 1], k[0, 2], k[1, 2], *r.ravel(), *t]
        lines.append(f"{cam.name} {rig.width} {rig.height} " + " ".join(f"{v:.10g}" for v in vals))
    (folder / "cameras.txt").write_text("\n".join(lines) + "\n")
    return cams
