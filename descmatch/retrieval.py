"""Image retrieval from descmatch's own local descriptors: a VLAD global descriptor per image
over a k-means codebook trained on the collection itself, and the most similar images of each.

VLAD (Jégou et al. 2010, normalised as in Arandjelović and Zisserman 2013): every local
descriptor is assigned to its nearest codeword; the residuals (descriptor - codeword) are
summed per codeword, each codeword's sum is L2-normalised (intra-normalisation), the
concatenation is power-normalised (signed square root) and L2-normalised. Images are then
compared by the dot product of their VLAD vectors.

The codebook is learned by Lloyd's k-means in torch on a seeded random subsample of the
collection's descriptors (k-means++ seeding), so the same features give the same pairs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .h5 import Reader

log = logging.getLogger(__name__)

DEFAULT_WORDS = 64
DEFAULT_SAMPLE = 100_000
DEFAULT_ITERS = 15
MAX_WORDS = 1024  # VLAD vectors are words x D floats per image (1024 x 128: 512 KiB)
DESCRIPTORS_PER_WORD = 16  # fewer descriptors than this per word make a meaningless codebook


@dataclass
class Codebook:
    """k-means centres. Shape: centres (K,D) float32."""

    centres: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.centres.shape[0])


def _sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances. Shape: (N,D), (K,D) -> (N,K)."""
    return (
        torch.addmm((x * x).sum(1, keepdim=True) + (c * c).sum(1)[None], x, c.t(), alpha=-2.0)
    ).clamp_min_(0)


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    return torch.cat([_sq_dists(x[s : s + chunk], c).argmin(1) for s in range(0, len(x), chunk)])


@torch.inference_mode()
def train_codebook(
    descriptors: torch.Tensor, k: int = DEFAULT_WORDS, iters: int = DEFAULT_ITERS, seed: int = 0
) -> Codebook:
    """Lloyd's k-means with k-means++ seeding; empty clusters are re-seeded with the points
    farthest from their centre. ``k`` is capped at the number of distinct points.

    Shape: descriptors (N,D) -> centres (min(k,N),D).
    """
    x = descriptors.float()
    n = len(x)
    if n == 0:
        raise InputError("no descriptors to build a retrieval codebook from")
    k = max(1, min(k, n))
    g = torch.Generator().manual_seed(seed)
    # k-means++ seeding
    centres = torch.empty((k, x.shape[1]), dtype=x.dtype)
    centres[0] = x[torch.randint(n, (1,), generator=g)]
    d2 = _sq_dists(x, centres[:1])[:, 0]
    for i in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: repeat one
            centres[i:] = centres[0]
            break
        j = torch.multinomial(d2 / total, 1, generator=g)
        centres[i] = x[j]
        d2 = torch.minimum(d2, _sq_dists(x, centres[i : i + 1])[:, 0])
    for _ in range(iters):
        a = _assign(x, centres)
        counts = torch.bincount(a, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, a, x)
        new = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        empty = counts == 0
        if empty.any():
            far = (x - new[a]).pow(2).sum(1).argsort(descending=True)
            new[empty] = x[far[: int(empty.sum())]]
        shift = float((new - centres).abs().max())
        centres = new
        if shift < 1e-6:
            break
    return Codebook(centres)


@torch.inference_mode()
def vlad(descriptors: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    """Intra-normalised, signed-square-rooted, L2-normalised VLAD of one image.

    Shape: descriptors (N,D) -> (K*D,) float32 (zeros for an image without descriptors).
    """
    c = codebook.centres
    k, d = c.shape
    x = descriptors.float()
    v = torch.zeros((k, d), dtype=torch.float32)
    if len(x):
        a = _assign(x, c)
        v.index_add_(0, a, x - c[a])
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = v.flatten()
    v = v.sign() * v.abs().sqrt()
    return v / v.norm().clamp_min(1e-12)


def _descriptors(reader: Reader, name: str) -> torch.Tensor:
    g = reader.read(name)
    if "descriptors" not in g:
        raise InputError(
            f"{reader.path}: image {name} has no descriptors (made by detect); "
            "run descmatch extract"
        )
    return torch.from_numpy(np.ascontiguousarray(g["descriptors"].T)).float()  # (N,D)


@dataclass
class GlobalDescriptors:
    """VLAD vectors of a collection. Shape: vectors (num_images, K*D) float32."""

    names: list[str]
    vectors: torch.Tensor
    codebook: Codebook

    def similarity(self) -> torch.Tensor:
        """Cosine similarities, -inf on the diagonal. Shape: (num_images, num_images)."""
        s = self.vectors @ self.vectors.t()
        s.fill_diagonal_(float("-inf"))
        return s


def global_descriptors(
    features: str | Path,
    names: list[str] | None = None,
    words: int = DEFAULT_WORDS,
    sample: int = DEFAULT_SAMPLE,
    iters: int = DEFAULT_ITERS,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
) -> GlobalDescriptors:
    """VLAD descriptors of the images of a features file (all of them, or ``names``), over a
    codebook of ``words`` words learned from at most ``sample`` of their local descriptors.

    ``words`` must lie in 1..MAX_WORDS (InputError otherwise); more words than the sampled
    descriptors support (DESCRIPTORS_PER_WORD each) are reduced to that, with a warning."""
    if not 1 <= words <= MAX_WORDS:
        raise InputError(f"--words {words}: must be between 1 and {MAX_WORDS}")
    features = Path(features)
    with Reader(features, "features") as reader:
        if int(reader.attrs.get("descriptor_dim", 0)) <= 0:
            raise InputError(
                f"{features}: holds keypoints only (made by detect); retrieval "
                "needs descriptors: run descmatch extract"
            )
        known = set(reader.keys)
        names = sorted(known) if names is None else list(names)
        missing = [n for n in names if n not in known]
        if missing:
            raise InputError(f"{features}: has no features for {_listing(missing)}")
        if not names:
            raise InputError(f"{features}: holds no images")
        # Two passes over the file, so memory holds one image's descriptors at a time plus
        # the sample: an even share of every image (no image dominates the codebook).
        rng = np.random.default_rng(seed)
        per_image = max(1, sample // len(names))
        picked, total = [], 0
        for i, n in enumerate(names):
            d = _descriptors(reader, n)
            total += len(d)
            if len(d) > per_image:
                idx = np.sort(rng.choice(len(d), per_image, replace=False))
                d = d[torch.from_numpy(idx)]
            picked.append(d)
            if progress:
                progress(i + 1, 2 * len(names), n)
        available = sum(len(p) for p in picked)
        fit = max(1, available // DESCRIPTORS_PER_WORD)
        if words > fit:
            log.warning(
                "--words %d: %d descriptors sampled support at most %d words "
                "(%d descriptors a word); using %d",
                words,
                available,
                fit,
                DESCRIPTORS_PER_WORD,
                fit,
            )
            words = fit
        codebook = train_codebook(torch.cat(picked), words, iters, seed)
        log.debug(
            "retrieval codebook: %d words from %d of %d descriptors",
            codebook.size,
            sum(len(p) for p in picked),
            total,
        )
        del picked
        vectors = []
        for i, n in enumerate(names):
            vectors.append(vlad(_descriptors(reader, n), codebook))
            if progress:
                progress(len(names) + i + 1, 2 * len(names), n)
    return GlobalDescriptors(names, torch.stack(vectors), codebook)


def nearest(
    similarity: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> list[list[int]]:
    """Indices of the ``k`` most similar other images of each image, best first
    (``exclude``: a boolean (N,N) mask of candidates to skip). Shape: (N,N) -> N lists."""
    s = similarity.clone()
    n = len(s)
    s.fill_diagonal_(float("-inf"))
    if exclude is not None:
        s[exclude] = float("-inf")
    k = max(0, min(k, n - 1))
    if k == 0:
        return [[] for _ in range(n)]
    vals, idx = torch.topk(s, k, dim=1)
    return [
        [int(j) for j, v in zip(row_i, row_v, strict=True) if v > float("-inf")]
        for row_i, row_v in zip(idx.tolist(), vals.tolist(), strict=True)
    ]


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
