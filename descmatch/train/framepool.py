"""The frame refiner's training pools: photo pairs with the detector's two frames and the
homography's Jacobian at the source keypoint (:func:`build_frame_pool`), one compressed
``.npz`` per photo folder and split in ``<out>/pools``, named by its settings and reused.

About 5% of the photos (every 20th from the 11th, or the last) make the validation pairs and
are not trained on. Pools are read without pickles (:func:`load_frame_pools`): a file holding
Python objects is refused with one line.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_savez
from ..errors import ConfigError, InputError
from ..geometry import homography_jacobian
from .photos import PhotoPairConfig, load_photo, photo_pairs
from .poolbuild import _select_images

if TYPE_CHECKING:
    from .frames import FramesConfig

Progress = Any
POOL_FORMAT = 1
FIELDS = ("patches", "a1", "s1", "a2", "s2", "jac")
#: Descriptor objective: pool patches are CONTEXT_PX wide and span CONTEXT keypoint windows at
#: the net patch's pixel step, so a window up to 1.8x larger, turned by any angle, lies
#: (nearly: 2.55 would be exact) inside, and the central 32x32 is the net's input patch.
CONTEXT = 2.5
CONTEXT_PX = 80


def _pair_config(cfg: FramesConfig) -> PhotoPairConfig:
    return PhotoPairConfig.of_pairs(cfg.max_tilt, cfg.pair_angle, cfg.pair_scale)


def build_frame_pool(
    photo_dir: Path,
    out: Path,
    cfg: FramesConfig,
    progress: Progress | None = None,
    surround: bool = False,
) -> tuple[Path, Path]:
    """The training and validation pools of one photo folder (built once, atomically).

    Shape: each ``.npz`` holds patches (K,2,P,P) uint8 (P = 32, or CONTEXT_PX with the
    surround for the descriptor objective), a1, s1, a2, s2 (K,) float32 and jac (K,2,2)
    float32; with ``surround`` (a central-surround teacher) also surround (K,2,P,P) uint8,
    the same pairs cut over twice the context at half the resolution.
    """
    conf = _pair_config(cfg)
    settings = {
        "format": POOL_FORMAT,
        "source": str(photo_dir.resolve()),
        "seed": cfg.seed,
        "pairs_per_image": cfg.pairs_per_image,
        "max_images": cfg.max_images,
        **conf.settings(),
    }
    cut: dict[str, Any] = {}
    if cfg.context:
        settings["context"] = [CONTEXT, CONTEXT_PX]
        cut = {"patch_size": CONTEXT_PX, "window_factor": CONTEXT}
        if surround:
            settings["surround"] = True
            cut["surround"] = True
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    paths = (out / f"{photo_dir.name}-{key}-train.npz", out / f"{photo_dir.name}-{key}-val.npz")
    if all(p.is_file() for p in paths):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    items = _select_images([photo_dir], cfg.max_images, cfg.seed)
    if not items:
        raise ConfigError(f"{photo_dir}: no photos to train on")
    rng = np.random.default_rng([cfg.seed, 11])
    held = set(range(min(10, len(items) - 1), len(items), 20))  # about 5%, at least one
    fields = (*FIELDS, "surround") if surround else FIELDS
    parts: dict[bool, dict[str, list[np.ndarray]]] = {
        v: {k: [] for k in fields} for v in (False, True)
    }
    for i, (path, name) in enumerate(items):
        pp = photo_pairs(
            load_photo(path, conf.max_side), rng, conf, max_pairs=cfg.pairs_per_image, **cut
        )
        if progress:
            progress(i + 1, len(items), f"frame pool {name}")
        if pp.mode != "detected" or len(pp) == 0:
            continue  # mapped pairs carry no detector noise: nothing to learn from
        dest = parts[i in held]
        for k, v in zip(
            fields,
            (
                pp.patches,
                pp.src_angle,
                pp.src_size,
                pp.dst_angle,
                pp.dst_size,
                homography_jacobian(pp.H, pp.src_xy).astype(np.float32),
                pp.surround,
            )[: len(fields)],
            strict=True,
        ):
            assert v is not None
            dest[k].append(v)
    for val, out_path in zip((False, True), paths, strict=True):
        if not parts[val]["a1"]:
            raise ConfigError(
                f"{photo_dir}: no {'validation' if val else 'training'} pairs "
                "(too few photos with detected pairs)"
            )
        arrays = {k: np.concatenate(v) for k, v in parts[val].items()}
        atomic_savez(out_path, compressed=True, **arrays, settings=np.asarray(json.dumps(settings)))
    return paths


def load_frame_pools(paths: list[Path]) -> dict[str, Tensor]:
    """The fields of these pools, concatenated (never unpickled: a file holding Python
    objects, or one that is not a frame pool, is a one-line InputError)."""
    data: list[dict[str, np.ndarray]] = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "settings"}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"{p}: not a frame pool ({first})") from None
        missing = [k for k in FIELDS if k not in arrays]
        if missing:
            raise InputError(f"{p}: not a frame pool (no {', '.join(missing)})")
        data.append(arrays)
    fields = [k for k in (*FIELDS, "surround") if all(k in d for d in data)]
    return {k: torch.from_numpy(np.concatenate([d[k] for d in data])) for k in fields}
