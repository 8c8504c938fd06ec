"""How far a patch descriptor can go on an HPatches-style sequence with these keypoints.

For a learned net (default: the shipped default weights) and RootSIFT, on the same DoG
keypoints (4000 per image), mutual nearest neighbours, no ratio test, correct within 3 px
under the true homography, summed over pairs 1-2 .. 1-6 and per pair:

  * ``possible@3`` / ``framed@3``: the maximum one-to-one matchings of keypoints within 3 px
    (all, and those whose frames agree), as ``descmatch eval homography`` prints them;
  * the net as shipped (fp32);
  * the net on domain-size pooled descriptors (``--size-pool 0.8,1,1.25``): the normalised
    sum of its descriptors at keypoint sizes 0.8x, 1x and 1.25x (three times the cost);
  * the net with an oracle affine frame: every image-i patch is cut in the frame of the true
    local affine map of the homography (its Jacobian at the keypoint, determinant
    normalised), so the foreshortening between the views is removed exactly; orientations
    are the detector's, measured in that frame. No method has this frame; it bounds what an
    affine shape estimate (Baumberg iteration, AffNet) can bring this descriptor;
  * the net with oracle orientations, scales, or both (``--oracle-frames``): every image-i
    keypoint that has image-1 keypoints mapped within 3 px takes the mapped orientation
    and/or size of the one among them whose mapped orientation is nearest its own, so the
    frames of corresponding keypoints agree exactly; it bounds what a keypoint orientation or
    scale estimate (the learned ``frames`` refiner, OriNet) can bring;
  * the net with the shipped frame refiner (``weights/frames.pt``) when there is one, and
    with it and the default size pooling (``--size-pool auto``): descmatch's defaults;
  * the net on PCA-whitened and on learned-whitened descriptors (Radenovic et al.'s Lw,
    fitted on ``--whiten-pool`` training pairs) when ``--whiten-pool`` names pair pools.

    python benchmarks/ceilings.py --seq DIR [--method sosnet] [--weights PATH]
                                  [--oracle-frames] [--whiten-pool OUT/pools/P ...]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from descmatch.describe import NetDescriber, build_describer
from descmatch.detect import SiftDetector
from descmatch.evaluate import evaluate_homography, read_homography
from descmatch.geometry import homography_jacobian, map_keypoints
from descmatch.patches import build_pyramid, extract_patches
from descmatch.weights import weights_dir


class OracleAffine:
    """Image i (the i-th call) cut in the true local affine frame of H_1_i; image 1 as is."""

    def __init__(self, net: NetDescriber, seq: Path) -> None:
        self.net, self.seq, self.calls = net, seq, 0

    def __call__(self, image: np.ndarray, kps) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            return self.net(image, kps)
        h = read_homography(self.seq / f"H_1_{self.calls}")
        # H's Jacobian at the keypoint's preimage: the inverse of H^-1's Jacobian at it.
        jac = np.linalg.inv(homography_jacobian(np.linalg.inv(h), kps.xy))
        shape = jac / np.sqrt(np.abs(np.linalg.det(jac)))[:, None, None]
        # The detector's orientation is a gradient direction: in the normalised frame it is
        # shape^T g.
        t = np.deg2rad(kps.angle.astype(np.float64))
        g = np.einsum("nji,nj->ni", shape, np.stack([np.cos(t), np.sin(t)], 1))
        angle = np.rad2deg(np.arctan2(g[:, 1], g[:, 0])) % 360.0
        img = torch.from_numpy(image)
        patches = extract_patches(
            img,
            kps.xy,
            kps.size,
            angle,
            mr_size=self.net.mr_size,
            patch_size=self.net.net.patch_size,
            window_factor=self.net.net.window_factor,
            pyramid=build_pyramid(img),
            shape=shape.astype(np.float32),
        )
        return self.net.describe_patches(patches).numpy()


class OracleFrames:
    """Image i (the i-th call) in frames taken from image 1's keypoints mapped by H_1_i:
    ``what`` is "orientation", "scale" or "both"."""

    def __init__(self, net: NetDescriber, seq: Path, what: str) -> None:
        self.net, self.seq, self.what, self.calls, self.first = net, seq, what, 0, None

    def __call__(self, image: np.ndarray, kps) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            self.first = kps
            return self.net(image, kps)
        h = read_homography(self.seq / f"H_1_{self.calls}")
        k1 = self.first
        uv, size1, angle1, _ = map_keypoints(h, k1.xy, k1.size, k1.angle)
        # Every (image-i keypoint, mapped image-1 keypoint) pair within 3 px, vectorised:
        # image-1 keypoints sorted by x, a window of +-3 px in x searched for each.
        order = np.argsort(uv[:, 0])
        xs = uv[order, 0]
        lo = np.searchsorted(xs, kps.xy[:, 0] - 3.0)
        hi = np.searchsorted(xs, kps.xy[:, 0] + 3.0, side="right")
        ii = np.repeat(np.arange(len(kps)), hi - lo)
        jj = order[
            np.concatenate(
                [np.arange(a, b) for a, b in zip(lo, hi, strict=True)] or [np.zeros(0, np.int64)]
            ).astype(np.int64)
        ]
        near = np.linalg.norm(uv[jj] - kps.xy[ii], axis=1) <= 3.0
        ii, jj = ii[near], jj[near]
        diff = np.abs((angle1[jj] - kps.angle[ii] + 180.0) % 360.0 - 180.0)
        best = np.lexsort((diff, ii))  # by keypoint, nearest orientation first
        first = np.unique(ii[best], return_index=True)[1]
        ii, jj = ii[best][first], jj[best][first]
        angle, size = kps.angle.copy(), kps.size.copy()
        if self.what in ("orientation", "both"):
            angle[ii] = angle1[jj]
        if self.what in ("scale", "both"):
            size[ii] = size1[jj]
        return self.net(image, replace(kps, angle=angle, size=size, cv=None))


class Whitened:
    """The net's descriptors through ``(x - mean) @ proj.T``, renormalised."""

    def __init__(self, net: NetDescriber, mean: np.ndarray, proj: np.ndarray) -> None:
        self.net, self.mean, self.proj = net, mean, proj

    def __call__(self, image: np.ndarray, kps) -> np.ndarray:
        y = (self.net(image, kps).astype(np.float64) - self.mean) @ self.proj.T
        return (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float32)


def _inv_sqrt(c: np.ndarray) -> np.ndarray:
    w, u = np.linalg.eigh(c)
    return u @ np.diag(np.maximum(w, 1e-12) ** -0.5) @ u.T


def whitenings(
    net: NetDescriber, pools: list[str], per_pool: int = 20000
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """PCA whitening and learned whitening (Lw: whiten the matching pairs' difference
    covariance, then rotate to the principal axes of all descriptors) from pool pairs."""
    from descmatch.train.pool import PairPool

    rng = np.random.default_rng(0)
    a, b = [], []
    for path in pools:
        pool = PairPool.load(path)
        idx = np.sort(rng.choice(pool.num_points, min(per_pool, pool.num_points), replace=False))
        pairs = torch.from_numpy(pool.gather(idx)).float() / 255
        a.append(net.describe_patches(pairs[:, :1]).numpy())
        b.append(net.describe_patches(pairs[:, 1:]).numpy())
    da, db = np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)
    x = np.concatenate([da, db])
    mean, cov = x.mean(0), np.cov(x.T)
    p1 = _inv_sqrt(np.cov((da - db).T) / 2)
    _, rot = np.linalg.eigh(p1 @ cov @ p1.T)
    return {"PCA-whitened": (mean, _inv_sqrt(cov)), "learned whitening (Lw)": (mean, rot.T @ p1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=Path, required=True, help="HPatches-style sequence folder")
    ap.add_argument("--method", default="auto")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--max-keypoints", type=int, default=4000)
    ap.add_argument("--whiten-pool", action="append", default=[])
    ap.add_argument("--oracle-frames", action="store_true")
    args = ap.parse_args()

    det = SiftDetector(max_keypoints=args.max_keypoints)

    def built(frames: str = "none", size_pool: str = "none") -> NetDescriber:
        d = build_describer(
            args.method, args.weights, precision="fp32", frames=frames, size_pool=size_pool
        )
        assert isinstance(d, NetDescriber), "--method must name a learned net"
        return d

    net = built()
    runs: list[tuple[str, object]] = [
        ("RootSIFT", build_describer("rootsift")),
        (f"{net.name} ({net.meta.get('weights', '')}, fp32)", net),
        ("  + size pooling 0.8/1/1.25x", built(size_pool="0.8,1,1.25")),
        ("  + oracle affine frames (true homography)", OracleAffine(net, args.seq)),
    ]
    if args.oracle_frames:
        runs += [
            (f"  + oracle {w}", OracleFrames(net, args.seq, w))
            for w in ("orientation", "scale", "both")
        ]
    if (weights_dir() / "frames.pt").is_file():
        runs += [
            ("  + learned frames (weights/frames.pt)", built(frames="frames")),
            (
                "  + learned frames and size pooling (the defaults)",
                built(frames="frames", size_pool="auto"),
            ),
        ]
    if args.whiten_pool:
        runs += [
            (f"  + {k}", Whitened(net, *v)) for k, v in whitenings(net, args.whiten_pool).items()
        ]

    print(
        f"# Ceilings on {args.seq.name}: {args.max_keypoints} keypoints, mutual NN, "
        "no ratio, correct within 3 px\n"
    )
    rows, bounds = [], None
    for label, desc in runs:
        t0 = time.perf_counter()
        res = evaluate_homography(args.seq, desc, det)
        bounds = bounds or ([r.possible for r in res], [r.framed for r in res])
        rows.append(
            (
                label,
                [r.correct[3] for r in res],
                sum(r.matches for r in res),
                time.perf_counter() - t0,
            )
        )
    pairs = [f"1-{i}" for i in range(2, 2 + len(bounds[0]))]
    print("| | " + " | ".join(pairs) + " | all | MMA@3 | x RootSIFT |")
    print("|---" * (len(pairs) + 4) + "|")
    for name, vals in (("possible@3", bounds[0]), ("framed@3", bounds[1])):
        print(f"| {name} | " + " | ".join(map(str, vals)) + f" | {sum(vals)} | | |")
    base = sum(rows[0][1])
    for label, vals, matches, _ in rows:
        print(
            f"| {label} | "
            + " | ".join(map(str, vals))
            + f" | {sum(vals)} | {sum(vals) / max(matches, 1):.3f} | {sum(vals) / base:.3f} |"
        )
    print("\nSeconds per run: " + ", ".join(f"{lab.strip()} {s:.0f}" for lab, _, _, s in rows))


if __name__ == "__main__":
    main()
