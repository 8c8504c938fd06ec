"""A DoG (SIFT) keypoint detector in torch, for the GPU: the scale space, the 3x3x3 extremum
search, the sub-pixel refinement, the contrast and edge tests and the orientation histograms
all run as batched tensor operations on the image's device.

It follows OpenCV's SIFT detector (``cv2.SIFT_create(enable_precise_upscale=True)``) step by
step, so its keypoints agree with :class:`~descmatch.detect.SiftDetector`'s in position, size
(OpenCV diameter), angle (OpenCV convention) and response:

* the image is upsampled 2x (pixel j of the upsampled image at original coordinate j/2) and
  blurred from an assumed sigma of 1.0 to ``sigma``; each octave holds ``n_octave_layers + 3``
  Gaussian images (reflect-101 borders, kernel radius 4 sigma), the next octave starts from
  layer ``n_octave_layers`` taken every other pixel;
* extrema of the DoG over their 26 neighbours in layers 1..n, 5 pixels from the border, are
  refined by up to 5 Newton steps in (x, y, scale), kept when ``|D(x^)| * n >=
  contrast_threshold`` and the Hessian's curvature ratio passes ``edge_threshold``;
* orientation: a 36-bin histogram of gradient directions (Gaussian weight 1.5 sigma, square
  window of radius 4.5 sigma, smoothed with [1 4 6 4 1]/16), one keypoint per peak above 80%
  of the highest, parabola-interpolated.

Differences from OpenCV are those of float arithmetic (OpenCV's pre-filter threshold rounds
down to an integer grey level, which for low contrast thresholds admits every extremum; here
half the final threshold is used, which the final test would reject anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .detect import DoGSettings, Keypoints

_BORDER = 5  # OpenCV's SIFT_IMG_BORDER
_MAX_STEPS = 5  # SIFT_MAX_INTERP_STEPS
_ORI_BINS = 36
_ORI_RADIUS = 3 * 1.5  # SIFT_ORI_RADIUS, in units of the keypoint's octave sigma
_ORI_SIG = 1.5
_ORI_PEAK = 0.8


def _gauss_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    r = max(1, int(round(sigma * 4)))  # OpenCV's float kernels: ksize = round(8 sigma + 1) | 1
    x = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect-101 borders. Shape: (B,1,H,W) -> same."""
    k = _gauss_kernel(sigma, x.device)
    r = (k.numel() - 1) // 2
    h, w = x.shape[-2:]
    if r >= min(h, w):  # reflect padding needs r < size: blur in pieces
        half = sigma / math.sqrt(2.0)
        return _blur(_blur(x, half), half)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))


def _upsample2(img: torch.Tensor) -> torch.Tensor:
    """Upsample 2x so that pixel j lands at coordinate j/2 (OpenCV's precise upscale).
    Shape: (H,W) -> (2H,2W)."""
    h, w = img.shape
    nx = torch.cat([img[:, 1:], img[:, -1:]], 1)
    row = torch.stack([img, 0.5 * (img + nx)], 2).reshape(h, 2 * w)
    ny = torch.cat([row[1:], row[-1:]], 0)
    return torch.stack([row, 0.5 * (row + ny)], 1).reshape(2 * h, 2 * w)


@dataclass(frozen=True)
class DoGDetector(DoGSettings):
    """OpenCV-compatible SIFT/DoG detection on the device ``device`` (see module doc).

    Same settings and result as :class:`~descmatch.detect.SiftDetector`, with no OpenCV
    KeyPoint objects (so no classical SIFT descriptor: use it with a learned net).
    """

    device: str = "cpu"

    @torch.inference_mode()
    def __call__(self, image: np.ndarray | torch.Tensor) -> Keypoints:
        """Detect on a gray float32 image in [0,1]. Shape: image (H,W)."""
        img = torch.as_tensor(image, dtype=torch.float32, device=torch.device(self.device))
        if img.ndim != 2:
            raise ValueError(f"image must be (H,W), got {tuple(img.shape)}")
        if min(img.shape) < 16:
            return Keypoints.empty()
        xy, size, angle, resp = self.detect_tensors(img)
        order = torch.argsort(-resp, stable=True)
        if self.max_keypoints > 0:
            order = order[: self.max_keypoints]
        out = [t[order].cpu().numpy().astype(np.float32) for t in (xy, size, angle, resp)]
        return Keypoints(np.ascontiguousarray(out[0]), out[1], out[2], out[3], None, self)

    def detect_tensors(
        self, img: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """All keypoints, unsorted, on the image's device: xy (N,2), size, angle, response."""
        n = self.n_octave_layers
        s0 = self.sigma
        k = 2.0 ** (1.0 / n)
        # Incremental blurs between consecutive layers of an octave.
        steps = [math.sqrt((s0 * k**i) ** 2 - (s0 * k ** (i - 1)) ** 2) for i in range(1, n + 3)]
        base = _upsample2(img)[None, None] * 255.0  # OpenCV's scale space is in grey levels
        base = _blur(base, math.sqrt(max(s0 * s0 - 1.0, 0.01)))
        found: list[tuple[torch.Tensor, ...]] = []
        octave = 0
        while min(base.shape[-2:]) > 2 * _BORDER + 2:
            gauss = [base]
            for s in steps:
                gauss.append(_blur(gauss[-1], s))
            g = torch.cat(gauss, 1)[0]  # (n+3,H,W)
            dog = g[1:] - g[:-1]  # (n+2,H,W)
            kp = self._extrema(dog)
            if kp is not None:
                li, yi, xi, off, resp = kp
                found.append(self._orient(g, li, yi, xi, off, resp, octave))
            base = gauss[n][..., ::2, ::2]
            octave += 1
        if not found:
            z = torch.zeros((0,), device=img.device)
            return torch.zeros((0, 2), device=img.device), z, z, z
        xy, size, angle, resp = (torch.cat(t) for t in zip(*found, strict=True))
        return xy, size, angle, resp

    # -- extrema and refinement ----------------------------------------------------------
    def _extrema(
        self, dog: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        n = self.n_octave_layers
        L, H, W = dog.shape
        thr = 0.5 * self.contrast_threshold / n * 255.0
        d5 = dog[None, None]
        mx = F.max_pool3d(d5, 3, 1, 1)[0, 0]
        mn = -F.max_pool3d(-d5, 3, 1, 1)[0, 0]
        ext = ((dog == mx) & (dog > thr)) | ((dog == mn) & (dog < -thr))
        ext[0] = False
        ext[-1] = False
        ext[:, :_BORDER] = False
        ext[:, H - _BORDER :] = False
        ext[:, :, :_BORDER] = False
        ext[:, :, W - _BORDER :] = False
        idx = torch.nonzero(ext)
        if idx.shape[0] == 0:
            return None
        li, yi, xi = idx[:, 0], idx[:, 1], idx[:, 2]
        alive = torch.ones_like(li, dtype=torch.bool)
        done = torch.zeros_like(alive)
        off = torch.zeros((li.shape[0], 3), device=dog.device)
        grad = torch.zeros_like(off)
        for _ in range(_MAX_STEPS):
            todo = alive & ~done
            if not bool(todo.any()):
                break
            t = torch.nonzero(todo).squeeze(1)
            g, h = _derivatives(dog, li[t], yi[t], xi[t])
            sol, info = torch.linalg.solve_ex(h, g.unsqueeze(2))
            x = torch.where((info == 0)[:, None], -sol.squeeze(2), 0.0)  # (x,y,s); singular: 0
            grad[t], off[t] = g, x
            conv = (x.abs() < 0.5).all(1)
            done[t[conv]] = True
            mv = t[~conv]
            xm = x[~conv]
            huge = (xm.abs() > 1e6).any(1) | ~torch.isfinite(xm).all(1)
            xi[mv] = xi[mv] + torch.round(xm[:, 0]).clamp(-1e6, 1e6).long()
            yi[mv] = yi[mv] + torch.round(xm[:, 1]).clamp(-1e6, 1e6).long()
            li[mv] = li[mv] + torch.round(xm[:, 2]).clamp(-1e6, 1e6).long()
            out = (
                huge
                | (li[mv] < 1)
                | (li[mv] > n)
                | (yi[mv] < _BORDER)
                | (yi[mv] >= H - _BORDER)
                | (xi[mv] < _BORDER)
                | (xi[mv] >= W - _BORDER)
            )
            alive[mv[out]] = False
            li[mv[out]], yi[mv[out]], xi[mv[out]] = 1, _BORDER, _BORDER  # safe to index
        keep = alive & done
        if not bool(keep.any()):
            return None
        # Extrema that stepped onto the same sample are one keypoint (OpenCV removes the
        # duplicates after sorting).
        key = (li * H + yi) * W + xi
        key = torch.where(keep, key, -1)
        uniq, inv = torch.unique(key, return_inverse=True)
        first = torch.full((uniq.shape[0],), key.shape[0], device=key.device, dtype=torch.long)
        first = first.scatter_reduce(0, inv, torch.arange(key.shape[0], device=key.device), "amin")
        sel = first[uniq >= 0]
        li, yi, xi, off, grad = li[sel], yi[sel], xi[sel], off[sel], grad[sel]
        val = dog[li, yi, xi]
        contr = (val + 0.5 * (grad * off).sum(1)) / 255.0
        dxx, dyy, dxy = _hessian2(dog, li, yi, xi)
        tr, det = dxx + dyy, dxx * dyy - dxy * dxy
        e = self.edge_threshold
        ok = (
            (contr.abs() * n >= self.contrast_threshold)
            & (det > 0)
            & (tr * tr * e < (e + 1) ** 2 * det)
        )
        if not bool(ok.any()):
            return None
        return li[ok], yi[ok], xi[ok], off[ok], contr.abs()[ok]

    # -- orientation ---------------------------------------------------------------------
    def _orient(
        self,
        g: torch.Tensor,
        li: torch.Tensor,
        yi: torch.Tensor,
        xi: torch.Tensor,
        off: torch.Tensor,
        resp: torch.Tensor,
        octave: int,
    ) -> tuple[torch.Tensor, ...]:
        n = self.n_octave_layers
        dev = g.device
        scl = self.sigma * torch.pow(2.0, (li.float() + off[:, 2]) / n)  # octave sigma
        step = 2.0 ** (octave - 1)  # original pixels per octave pixel (octave 0: upsampled)
        xy = torch.stack([(xi.float() + off[:, 0]) * step, (yi.float() + off[:, 1]) * step], 1)
        size = scl * 2.0 * step
        if self.upright:
            return xy, size, torch.zeros_like(size), resp
        _, H, W = g.shape
        radius = torch.round(_ORI_RADIUS * scl).long()  # (K,)
        rmax = int(radius.max().item())
        r = torch.arange(-rmax, rmax + 1, device=dev)
        oy, ox = torch.meshgrid(r, r, indexing="ij")
        oy, ox = oy.reshape(-1), ox.reshape(-1)
        y = yi[:, None] + oy[None]
        x = xi[:, None] + ox[None]
        valid = (
            (oy.abs()[None] <= radius[:, None])
            & (ox.abs()[None] <= radius[:, None])
            & (y > 0)
            & (y < H - 1)
            & (x > 0)
            & (x < W - 1)
        )
        yc, xc = y.clamp(1, H - 2), x.clamp(1, W - 2)
        flat = g.reshape(-1)
        base = (li * (H * W))[:, None]  # the keypoint's Gaussian layer

        def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
            return flat[base + yy * W + xx]

        dx = at(yc, xc + 1) - at(yc, xc - 1)
        dy = at(yc - 1, xc) - at(yc + 1, xc)
        sig_w = _ORI_SIG * scl
        w = torch.exp(-(oy[None] ** 2 + ox[None] ** 2).float() / (2 * sig_w[:, None] ** 2))
        mag = torch.sqrt(dx * dx + dy * dy) * w * valid
        ori = torch.rad2deg(torch.atan2(dy, dx)) % 360.0
        b = torch.round(ori * (_ORI_BINS / 360.0)).long() % _ORI_BINS
        K = li.shape[0]
        hist = torch.zeros(K * _ORI_BINS, device=dev)
        hist.index_add_(
            0, (torch.arange(K, device=dev)[:, None] * _ORI_BINS + b).reshape(-1), mag.reshape(-1)
        )
        hist = hist.view(K, _ORI_BINS)

        def roll(t: torch.Tensor, s: int) -> torch.Tensor:  # t[i - s]
            return torch.roll(t, s, 1)

        sm = (
            (roll(hist, 2) + roll(hist, -2)) * (1 / 16)
            + (roll(hist, 1) + roll(hist, -1)) * (4 / 16)
            + hist * (6 / 16)
        )
        left, right = roll(sm, 1), roll(sm, -1)
        peak = (sm > left) & (sm > right) & (sm >= _ORI_PEAK * sm.max(1, keepdim=True).values)
        ki, bi = torch.nonzero(peak, as_tuple=True)
        lv, cv, rv = left[ki, bi], sm[ki, bi], right[ki, bi]
        binf = bi.float() + 0.5 * (lv - rv) / (lv - 2 * cv + rv)
        binf = torch.where(binf < 0, binf + _ORI_BINS, binf)
        binf = torch.where(binf >= _ORI_BINS, binf - _ORI_BINS, binf)
        angle = 360.0 - (360.0 / _ORI_BINS) * binf
        angle = torch.where((angle - 360.0).abs() < 1e-4, torch.zeros_like(angle), angle)
        return xy[ki], size[ki], angle, resp[ki]


def _derivatives(
    d: torch.Tensor,
    l: torch.Tensor,  # noqa: E741
    y: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (K,3) and Hessian (K,3,3) of the DoG stack in (x, y, scale), central
    differences as in OpenCV's adjustLocalExtrema."""

    def v(dl: int, dy: int, dx: int) -> torch.Tensor:
        return d[l + dl, y + dy, x + dx]

    c = v(0, 0, 0)
    gx = 0.5 * (v(0, 0, 1) - v(0, 0, -1))
    gy = 0.5 * (v(0, 1, 0) - v(0, -1, 0))
    gs = 0.5 * (v(1, 0, 0) - v(-1, 0, 0))
    dxx = v(0, 0, 1) + v(0, 0, -1) - 2 * c
    dyy = v(0, 1, 0) + v(0, -1, 0) - 2 * c
    dss = v(1, 0, 0) + v(-1, 0, 0) - 2 * c
    dxy = 0.25 * (v(0, 1, 1) - v(0, 1, -1) - v(0, -1, 1) + v(0, -1, -1))
    dxs = 0.25 * (v(1, 0, 1) - v(1, 0, -1) - v(-1, 0, 1) + v(-1, 0, -1))
    dys = 0.25 * (v(1, 1, 0) - v(1, -1, 0) - v(-1, 1, 0) + v(-1, -1, 0))
    g = torch.stack([gx, gy, gs], 1)
    h = torch.stack(
        [
            torch.stack([dxx, dxy, dxs], 1),
            torch.stack([dxy, dyy, dys], 1),
            torch.stack([dxs, dys, dss], 1),
        ],
        1,
    )
    return g, h


def _hessian2(
    d: torch.Tensor,
    l: torch.Tensor,  # noqa: E741
    y: torch.Tensor,
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = d[l, y, x]
    dxx = d[l, y, x + 1] + d[l, y, x - 1] - 2 * c
    dyy = d[l, y + 1, x] + d[l, y - 1, x] - 2 * c
    dxy = 0.25 * (d[l, y + 1, x + 1] - d[l, y + 1, x - 1] - d[l, y - 1, x + 1] + d[l, y - 1, x - 1])
    return dxx, dyy, dxy
