"""Training data of the descriptor nets: data sources (``[KIND:]PATH[@WEIGHT]``, opened or
built into pools by :func:`open_source`) and validation sets (:class:`ValSet`).

Kinds: ``photos`` (a folder of photos, made into a pool under ``<out>/pools`` once, see
:mod:`.poolbuild`; a folder that already is a pool is used as it is), ``pool`` (a pool
folder), ``brown`` (a Brown/PhotoTour folder), ``multiview`` (a scene folder with
``cameras.txt`` + ``images/``, or a folder of such scenes, see :mod:`.multiview`; it must be
named) or ``hpatches`` (an HPatches-style sequence or a folder of them, see :mod:`.hpatches`;
it must be named); without KIND it is guessed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, InputError
from ..nets import DescriptorNet
from .brown import BrownDataset
from .hpatches import build_hpatches_pool_for
from .multiview import MultiviewPairPool, build_multiview_pool_for
from .pool import PairPool, is_pool
from .poolbuild import build_photo_pool_for

if TYPE_CHECKING:
    from .config import TrainConfig

Progress = Callable[[int, int, str], None]
DATA_KINDS = ("photos", "pool", "brown", "multiview", "hpatches")


@dataclass(frozen=True)
class DataSpec:
    """One data source: ``[KIND:]PATH[@WEIGHT]``, KIND in photos, pool, brown, multiview,
    hpatches."""

    kind: str
    path: Path
    weight: float = 1.0

    @staticmethod
    def parse(spec: str | DataSpec) -> DataSpec:
        if isinstance(spec, DataSpec):
            return spec
        text = str(spec)
        weight = 1.0
        if "@" in text:
            head, tail = text.rsplit("@", 1)
            try:
                weight = float(tail)
                text = head
            except ValueError:
                pass
        kind = ""
        if ":" in text and text.split(":", 1)[0] in DATA_KINDS:
            kind, text = text.split(":", 1)
        path = Path(text).expanduser()
        if not kind:
            if is_pool(path):
                kind = "pool"
            elif (path / "info.txt").is_file():
                kind = "brown"
            else:
                kind = "photos"
        if weight < 0 or not math.isfinite(weight):
            raise ConfigError(f"{spec}: the weight must be a number >= 0")
        return DataSpec(kind, path, weight)

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}@{self.weight:g}"


@dataclass
class ValSet:
    """Verification pairs. Shape: patches (M,P,P) uint8; idx0, idx1 (L,) int64; is_match (L,)."""

    name: str
    patches: np.ndarray
    idx0: np.ndarray
    idx1: np.ndarray
    is_match: np.ndarray


def one_window(net_cls: type[DescriptorNet]) -> float:
    """The window factor of a one-patch net (multi-view nets train by distillation only)."""
    wf = net_cls.window_factor
    if isinstance(wf, tuple):
        raise ConfigError(f"{net_cls.name}: a multi-view net trains with --method distill")
    return float(wf)


def fit_pool(
    pool: PairPool, net_cls: type[DescriptorNet], config: TrainConfig, mr_sizes: list[float]
) -> PairPool:
    """Check a photo pool fits the net (and crop a 64-px/2x pool for the 32-px nets)."""
    if pool.kind == "brown":
        return pool
    meta = pool.meta
    size, wf = int(meta.get("patch_size", pool.patch_size)), float(meta.get("window_factor", 1))
    mr_sizes.append(float(meta.get("mr_size", config.mr_size)))
    p, nwf = net_cls.patch_size, one_window(net_cls)
    if size == p and wf == nwf:
        return pool
    if size == 2 * p and wf == 2 * nwf:
        return pool.center_crop(p)
    raise ConfigError(
        f"{pool.name}: pool patches are {size} px with window factor {wf:g}; "
        f"{net_cls.name} needs {p} px with window factor {nwf:g} (build the pool "
        "for it)"
    )


def _prefixed(progress: Progress | None, label: str) -> Progress:
    """``progress`` with ``label: `` before each message (nothing without one)."""

    def report(i: int, n: int, msg: str) -> None:
        if progress:
            progress(i, n, f"{label}: {msg}")

    return report


def open_source(
    spec: DataSpec,
    net_cls: type[DescriptorNet],
    config: TrainConfig,
    mr_sizes: list[float],
    progress: Progress | None,
) -> PairPool:
    if config.frames and spec.kind in ("brown", "hpatches"):
        raise ConfigError(
            f"--frames: {spec} is not cut in refined frames (photos, multiview "
            "and pools made with --frames are)"
        )
    if spec.kind == "brown":
        ds = BrownDataset(spec.path, patch_size=net_cls.patch_size)
        return PairPool.from_brown(ds, name=f"brown:{spec.path}")
    if spec.kind == "pool" or (spec.kind == "photos" and is_pool(spec.path)):
        return fit_pool(PairPool.load(spec.path), net_cls, config, mr_sizes)
    if spec.kind == "photos":
        if not spec.path.is_dir():
            raise InputError(f"{spec.path}: no such photo folder")
        out = build_photo_pool_for(
            spec.path,
            Path(config.out_dir) / "pools",
            net_cls.patch_size,
            config.mr_size,
            one_window(net_cls),
            config.pairs_per_image,
            config.seed,
            config.pool_workers,
            _prefixed(progress, f"pool {spec.path.name}"),
            conf=config.photo_conf(),
            max_images=config.max_images,
            frames=config.frames,
        )
        return fit_pool(PairPool.load(out), net_cls, config, mr_sizes)
    if spec.kind == "multiview":
        if is_pool(spec.path):
            out = spec.path
        else:
            out = build_multiview_pool_for(
                spec.path,
                Path(config.out_dir) / "pools",
                net_cls.patch_size,
                config.mr_size,
                net_cls.window_factor,
                config.seed,
                _prefixed(progress, "multiview pool"),
                frames=config.frames,
            )
        return fit_pool(MultiviewPairPool.load(out), net_cls, config, mr_sizes)
    if spec.kind == "hpatches":
        if is_pool(spec.path):
            out = spec.path
        else:
            out = build_hpatches_pool_for(
                spec.path,
                Path(config.out_dir) / "pools",
                net_cls.patch_size,
                config.mr_size,
                one_window(net_cls),
                config.pairs_per_image,
                config.seed,
                _prefixed(progress, "hpatches pool"),
                conf=config.photo_conf(),
            )
        return fit_pool(PairPool.load(out), net_cls, config, mr_sizes)
    raise ConfigError(f"unknown data kind {spec.kind!r}; valid: {', '.join(DATA_KINDS)}")


def brown_val(path: Path, patch_size: int, max_pairs: int, seed: int) -> ValSet:
    ds = BrownDataset(path, patch_size=patch_size)
    idx0, idx1, is_match = ds.pairs()
    if len(idx0) > max_pairs:
        pick = np.sort(
            np.random.default_rng([seed, 29]).choice(len(idx0), max_pairs, replace=False)
        )
        idx0, idx1, is_match = idx0[pick], idx1[pick], is_match[pick]
    used, inv = np.unique(np.concatenate([idx0, idx1]), return_inverse=True)
    inv = inv.reshape(-1)
    return ValSet(f"brown:{path}", ds.patches[used], inv[: len(idx0)], inv[len(idx0) :], is_match)


def pool_val(pool: PairPool, num_points: int, seed: int, name: str) -> ValSet:
    patches, idx0, idx1, is_match = pool.verification_set(num_points, seed)
    return ValSet(name, patches, idx0, idx1, is_match)
