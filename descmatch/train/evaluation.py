"""Patch-verification evaluation on the Brown/PhotoTour pairs: FPR at 95 % recall."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError

if TYPE_CHECKING:
    from .brown import BrownDataset


def fpr_at_recall(distances: np.ndarray, is_match: np.ndarray, recall: float = 0.95) -> float:
    """False positive rate at the smallest distance threshold that accepts ``recall`` of the
    true matches (Brown protocol, FPR95 for ``recall=0.95``).

    A pair is accepted when its distance is <= the threshold, so all pairs tied at the threshold
    distance are accepted together. Returns FP / (number of non-matching pairs).
    Shapes: distances (L,), is_match (L,) bool -> float.
    """
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    m = np.asarray(is_match).reshape(-1).astype(bool)
    if d.shape != m.shape:
        raise ValueError(f"distances and is_match differ in length: {d.shape[0]} vs {m.shape[0]}")
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    num_pos = int(m.sum())
    num_neg = int(m.size - num_pos)
    if num_pos == 0:
        raise ValueError("no matching pairs: the recall is undefined")
    if num_neg == 0:
        raise ValueError("no non-matching pairs: the false positive rate is undefined")

    order = np.argsort(d, kind="stable")
    d, m = d[order], m[order]
    tp = np.cumsum(m)
    fp = np.cumsum(~m)
    # Last index of each run of equal distances: the counts once that whole run is accepted.
    ends = np.flatnonzero(np.append(d[1:] != d[:-1], True))
    # Integer target, guarded against 0.95 * L landing a hair above an integer.
    needed = max(1, math.ceil(recall * num_pos - 1e-9))
    k = ends[np.searchsorted(tp[ends], needed, side="left")]
    return float(fp[k]) / num_neg


def describe_patches(
    net: nn.Module, patches: np.ndarray, device: torch.device, batch_size: int = 1024
) -> np.ndarray:
    """Descriptors of uint8 patches, computed in chunks in eval mode.

    The patches are scaled to [0, 1] and given to the net as (N, 1, S, S) (a multi-view net's
    (M, V, S, S) as they are); the net does its own per-patch normalisation. The net's
    train/eval mode is restored afterwards.
    Shape: patches (M, S, S) or (M, V, S, S) uint8 -> (M, D) float32.
    """
    if patches.ndim not in (3, 4) or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"patches must be (M, S, S) or (M, V, S, S), got shape {patches.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    expected = getattr(net, "patch_size", None)
    if expected is not None and int(expected) != patches.shape[-1]:
        label = getattr(net, "name", "") or type(net).__name__
        raise ConfigError(f"{label} takes {expected}-px patches, got {patches.shape[-1]}-px ones")
    device = torch.device(device)
    was_training = net.training
    net.eval()
    out: np.ndarray | None = None
    try:
        with torch.inference_mode():
            for start in range(0, len(patches), batch_size):
                chunk = np.ascontiguousarray(patches[start : start + batch_size])
                x = torch.from_numpy(chunk).to(device).float().div_(255.0)
                x = x.unsqueeze(1) if x.ndim == 3 else x  # (B,views,S,S)
                desc = net(x).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(patches), desc.shape[1]), dtype=np.float32)
                out[start : start + len(desc)] = desc
    finally:
        net.train(was_training)
    if out is None:
        dim = getattr(net, "dim", 0)
        return np.zeros((0, int(dim) if isinstance(dim, int) else 0), dtype=np.float32)
    return out


def pair_distances(
    desc: np.ndarray, idx0: np.ndarray, idx1: np.ndarray, chunk: int = 65536
) -> np.ndarray:
    """L2 distances between rows ``desc[idx0]`` and ``desc[idx1]``, chunked to bound memory.

    Shape: desc (M, D), idx0 (L,), idx1 (L,) -> (L,) float32.
    """
    out = np.empty(len(idx0), dtype=np.float32)
    for s in range(0, len(idx0), chunk):
        diff = desc[idx0[s : s + chunk]] - desc[idx1[s : s + chunk]]
        out[s : s + chunk] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def evaluate_fpr95(
    net: nn.Module,
    dataset: BrownDataset,
    device: torch.device,
    batch_size: int = 1024,
    pairs_name: str | None = None,
) -> dict[str, float | int]:
    """FPR95 of ``net`` on a Brown dataset's pairs (the largest m50 file by default).

    Only the patches that appear in the pairs are described. Returns
    ``{"fpr95": float, "num_pairs": int, "num_matches": int}``.
    """
    idx0, idx1, is_match = dataset.pairs(pairs_name)
    used, inverse = np.unique(np.concatenate([idx0, idx1]), return_inverse=True)
    desc = describe_patches(net, dataset.patches[used], device, batch_size)
    inverse = inverse.reshape(-1)
    a, b = inverse[: len(idx0)], inverse[len(idx0) :]
    distances = pair_distances(desc, a, b)
    return {
        "fpr95": fpr_at_recall(distances, is_match, 0.95),
        "num_pairs": int(len(is_match)),
        "num_matches": int(is_match.sum()),
    }
