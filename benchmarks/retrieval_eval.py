"""How many truly overlapping image pairs does retrieval find, against exhaustive matching?

On a scene with known cameras (``cameras.txt`` and ``images/``, e.g.
Strecha entry-P10 or castle-P30):
  * features: descmatch extract with RootSIFT (or --method) into --work (reused if there);
  * ground truth, computed once for every pair: a pair overlaps when it has at least
    --min-matches RootSIFT matches (mutual nearest neighbours, ratio 0.85) within
    --threshold px of their epipolar lines under the true cameras;
  * retrieval:K (VLAD over a k-means codebook of the scene's own descriptors, as
    ``descmatch pairs --retrieval K``), and for comparison sequential:K and oracle:K (each
    image with the K others it truly shares the most matches with), against exhaustive.
Prints a table: pairs proposed, overlapping pairs found, recall, precision, and the mean
number of epipolar-consistent matches of the proposed pairs.

    python benchmarks/retrieval_eval.py PATH/TO/strecha/entry-P10 \
        --max-keypoints 2000 [--k 1 2 3 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from descmatch.cameras import epipolar_distance, fundamental_matrix, read_cameras
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.extract import extract
from descmatch.h5 import Reader
from descmatch.images import ImageList
from descmatch.match import DEFAULT_RATIO, match_descriptors
from descmatch.pairs import exhaustive, retrieval, sequential


def true_pairs(
    features: Path, cams: dict, names: list[str], min_matches: int, threshold: float
) -> dict[str, int]:
    """Epipolar-consistent RootSIFT matches of every pair ("a b" -> count)."""
    with Reader(features, "features") as r:
        f = {n: r.read(n) for n in names}
    counts = {}
    for a, b in exhaustive(names):
        m, _ = match_descriptors(
            torch.from_numpy(f[a]["descriptors"].T.copy()),
            torch.from_numpy(f[b]["descriptors"].T.copy()),
            DEFAULT_RATIO,
        )
        m = m.numpy()
        i0 = np.nonzero(m >= 0)[0]
        err = epipolar_distance(
            fundamental_matrix(cams[a], cams[b]), f[a]["keypoints"][i0], f[b]["keypoints"][m[i0]]
        )
        counts[f"{a} {b}"] = int((err < threshold).sum())
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scene", type=Path)
    ap.add_argument("--max-keypoints", type=int, default=2000)
    ap.add_argument("--method", default="rootsift", help="descriptor used for retrieval")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5])
    ap.add_argument("--words", type=int, default=64)
    ap.add_argument("--min-matches", type=int, default=50)
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    cams = read_cameras(args.scene / "cameras.txt")
    names = sorted(cams)
    img_dir = args.scene / "images"
    work = args.work or Path(tempfile.mkdtemp(prefix="retrieval-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    det = SiftDetector(max_keypoints=args.max_keypoints)
    t0 = time.perf_counter()
    rootsift = work / f"rootsift-{args.max_keypoints}.h5"
    extract(ImageList(img_dir, names), rootsift, build_describer("rootsift"), det)
    feats = rootsift
    if args.method != "rootsift":
        feats = work / f"{args.method}-{args.max_keypoints}.h5"
        extract(ImageList(img_dir, names), feats, build_describer(args.method), det)
    t_extract = time.perf_counter() - t0

    gt_file = work / f"overlap-{args.max_keypoints}-{args.threshold:g}px.json"
    if gt_file.is_file():
        counts = json.loads(gt_file.read_text())
    else:
        counts = true_pairs(rootsift, cams, names, args.min_matches, args.threshold)
        gt_file.write_text(json.dumps(counts, indent=0))
    truth = {tuple(k.split()) for k, v in counts.items() if v >= args.min_matches}
    total = len(exhaustive(names))

    def row(label: str, pairs: list[tuple[str, str]], seconds: float | None = None) -> str:
        got = {tuple(sorted(p)) for p in pairs}
        found = len(got & truth)
        recall = found / len(truth) if truth else float("nan")
        precision = found / len(got) if got else float("nan")
        sec = f"{seconds:.2f}" if seconds is not None else ""
        mean = np.mean([counts[" ".join(p)] for p in got]) if got else 0.0
        return (
            f"| {label} | {len(got)} | {found} | {recall:.3f} | {precision:.3f} | "
            f"{mean:.0f} | {sec} |"
        )

    def oracle(k: int) -> list[tuple[str, str]]:
        """Each image with the k others it shares the most consistent matches with."""
        out = []
        for a in names:
            others = sorted(
                (b for b in names if b != a), key=lambda b: -counts[" ".join(sorted((a, b)))]
            )
            out += [tuple(sorted((a, b))) for b in others[:k]]
        return sorted(set(out))

    print(
        f"{args.scene.name}: {len(names)} images, {total} pairs, {len(truth)} overlapping "
        f"(>= {args.min_matches} RootSIFT matches within {args.threshold:g} px of the true "
        f"epipolar lines; {args.max_keypoints} keypoints; extraction {t_extract:.1f} s)"
    )
    print(f"retrieval descriptor: {args.method}, VLAD {args.words} words\n")
    print(
        "| pairs | proposed | overlapping found | recall | precision | consistent matches "
        "per proposed pair | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    print(row("exhaustive", exhaustive(names)))
    for k in args.k:
        t = time.perf_counter()
        pairs = retrieval(feats, k, names, words=args.words)
        print(row(f"retrieval:{k}", pairs, time.perf_counter() - t))
    for k in args.k:
        print(row(f"sequential:{k}", sequential(names, k)))
    for k in args.k:
        print(row(f"oracle:{k} (best k per image)", oracle(k)))
    print("\noverlap per pair (epipolar-consistent matches), upper triangle:")
    print("      " + " ".join(f"{n[:5]:>5}" for n in names))
    for i, a in enumerate(names):
        cells = [f"{counts[f'{a} {b}']:5d}" if j > i else "    ." for j, b in enumerate(names)]
        print(f"{a[:5]:>5} " + " ".join(cells))


if __name__ == "__main__":
    main()
