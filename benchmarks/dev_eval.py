"""Choose the patch window (mr_size) and the ratio-test default by measurement.

Runs on an HPatches-style sequence (``--seq``, e.g. hpatches/v_churchill):
  * mr_size: the same DoG keypoints, patches cut by descmatch.patches at each mr_size and
    described by a fixed hand-crafted patch descriptor (kornia's SIFTDescriptor on 32x32
    patches, RootSIFT-normalised), mutual nearest neighbours, no ratio test;
  * ratio: RootSIFT (OpenCV) with mutual NN and each ratio;
  * the reference table: sift and rootsift with the shipped default matcher settings.
Prints tables: matches, correct matches at 3 px, and mean matching accuracy at 1/3/5 px,
summed over pairs 1-2 .. 1-6.

    python benchmarks/dev_eval.py --seq DIR [--max-keypoints 4000]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from descmatch.describe import SiftDescriber
from descmatch.detect import SiftDetector
from descmatch.evaluate import read_homography, score_homography
from descmatch.images import read_image
from descmatch.match import DEFAULT_RATIO, match_descriptors
from descmatch.patches import build_pyramid, extract_patches


def load_sequence(seq: Path, det: SiftDetector):
    imgs, kps = [], []
    for i in range(1, 7):
        img = read_image(next(seq.glob(f"{i}.*")))
        imgs.append(img)
        kps.append(det(img))
    hs = [read_homography(seq / f"H_1_{i}") for i in range(2, 7)]
    return imgs, kps, hs


def score(kps, descs, hs, ratio, mutual=True):
    tot_m, tot_c = 0, {1: 0, 3: 0, 5: 0}
    for i in range(1, 6):
        m, _ = match_descriptors(
            torch.from_numpy(descs[0]), torch.from_numpy(descs[i]), ratio, mutual
        )
        s = score_homography(kps[0].xy, kps[i].xy, m.numpy(), hs[i - 1], (1, 3, 5))
        tot_m += s.matches
        for t in tot_c:
            tot_c[t] += s.correct[t]
    return tot_m, tot_c


def row(label, m, c):
    mm = lambda t: c[t] / m if m else 0.0  # noqa: E731
    return f"| {label} | {m} | {c[3]} | {mm(1):.3f} | {mm(3):.3f} | {mm(5):.3f} |"


HEAD = "| {} | matches | correct@3px | MMA@1 | MMA@3 | MMA@5 |\n|---|---|---|---|---|---|"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=Path, required=True, help="HPatches-style sequence folder")
    ap.add_argument("--max-keypoints", type=int, default=4000)
    args = ap.parse_args()
    det = SiftDetector(max_keypoints=args.max_keypoints)
    imgs, kps, hs = load_sequence(args.seq, det)
    print(f"sequence {args.seq}, {args.max_keypoints} keypoints/image, pairs 1-2..1-6 summed\n")

    from kornia.feature import SIFTDescriptor

    sd = SIFTDescriptor(32, rootsift=True).eval()
    print("mr_size (patch SIFT on descmatch patches, mutual NN, no ratio)")
    print(HEAD.format("mr_size"))
    for mr in (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0):
        descs = []
        for img, k in zip(imgs, kps, strict=True):
            t = torch.from_numpy(img)
            with torch.inference_mode():
                p = extract_patches(t, k.xy, k.size, k.angle, 32, mr, pyramid=build_pyramid(t))
                descs.append(sd(p).numpy())
        print(row(f"{mr:g}", *score(kps, descs, hs, None)))

    print("\nratio (RootSIFT, mutual NN)")
    print(HEAD.format("ratio"))
    rs = SiftDescriber(root=True)
    descs = [rs(img, k) for img, k in zip(imgs, kps, strict=True)]
    for ratio in (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, None):
        print(row(f"{ratio if ratio else 'none'}", *score(kps, descs, hs, ratio)))

    print(f"\ndefaults (mutual NN + ratio {DEFAULT_RATIO}) and mutual NN alone")
    print(HEAD.format("method"))
    for root in (False, True):
        d = SiftDescriber(root=root)
        t0 = time.perf_counter()
        descs = [d(img, k) for img, k in zip(imgs, kps, strict=True)]
        for ratio in (DEFAULT_RATIO, None):
            label = f"{d.name}, {'ratio ' + str(ratio) if ratio else 'no ratio'}"
            print(row(label, *score(kps, descs, hs, ratio)))
        _ = time.perf_counter() - t0


if __name__ == "__main__":
    main()
