"""The training loop: pools of pairs -> batches -> net -> loss -> checkpoints, logs, weights.

``train(TrainConfig(...))`` trains one net and returns ``<out_dir>/<method>.pt`` (a descmatch
weights file that :func:`descmatch.weights.load_net` loads). What it does, in order:

* data: each source of ``config.data`` is ``[KIND:]PATH[@WEIGHT]`` with KIND ``photos`` (a
  folder of photos, made into a pool under ``<out_dir>/pools`` once, see :mod:`.pool`; a folder
  that already is a pool is used as it is), ``pool`` (a pool folder), ``brown`` (a
  Brown/PhotoTour folder), ``multiview`` (a scene folder with ``cameras.txt`` + ``images/``,
  or a folder of such scenes, made into a multi-view pool under ``<out_dir>/pools`` once, see
  :mod:`.multiview`; it must be named) or ``hpatches`` (an HPatches-style sequence, images
  1..N and ``H_1_i``, or a folder of them: pairs of detected keypoints that agree under the
  homography, made into a pool under ``<out_dir>/pools`` once, see :mod:`.hpatches`; it must
  be named); without KIND it is guessed. Each batch comes from one source, drawn with
  probability proportional to the weights; batch ``s`` is a pure function of ``(seed, s)``.
* sampler (how a batch's points are chosen in its source, :class:`~.pool.MixedBatches`):
  ``same-image`` (default: ``images_per_batch`` photos, many points each, hard negatives),
  ``random`` (HardNet: distinct points uniformly over the pool), ``progressive`` (L2-Net:
  ``p1_fraction`` of the batch walks a shuffled sequence of the pool, the rest random) or
  ``hard-negative`` (groups of ``mine_group`` points close in descriptor space; the first
  patches of a random subset of ``mine_points`` points are described with the current net
  every ``mine_every`` steps; what was mined is kept in the checkpoint).
* validation: ``config.val`` (``brown:PATH``: a subsample of its m50 pairs; ``pool:PATH`` or
  ``photos:PATH``: a verification set with same-photo negatives) or, by default,
  ``val_fraction`` of the photos of the first source held out from training; FPR95 by
  :func:`~descmatch.train.evaluation.fpr_at_recall` every ``eval_every`` steps (default: once
  per epoch over the training points) and at the end. ``val="none"`` turns it off.
* batch: uint8 from the pool, to float on the device; with ``augment`` the same random flip
  and 90-degree rotation for both patches of a pair and an independent small rotation
  (``rotation_jitter`` degrees) and scale (``scale_jitter``) per patch (one ``affine_grid``);
  one forward pass for anchors and positives together; the loss in fp32.
* precision: ``auto`` is bf16 autocast on CPUs with bf16 support (about twice the fp32 speed
  measured on AVX512-BF16) and on CUDA devices that have it, else fp16 with a gradient scaler
  on CUDA, else fp32.
* optimiser (defaults per method, :data:`METHOD_DEFAULTS`): HardNet's recipe is SGD, lr 10,
  momentum 0.9, dampening 0.9, weight decay 1e-4, linear decay to 0 (the official code's
  values; the towers are scale invariant -- batch norm without affine, L2-normalised output --
  so the step that matters is lr / |w|^2 and weight decay keeps it moving). L2-Net and SOSNet
  default to Adam, lr 1e-3, no weight decay, linear decay to 0 (our choice: the first CPU run
  of this project used Adam; the papers trained far longer than a CPU session).
* checkpoints every ``checkpoint_every`` steps and at the end (``<out_dir>/checkpoint.pt``:
  weights, optimiser, scheduler, scaler, step, RNG states, config); ``resume=True`` continues
  from it and gives the same batches, losses and weights as an uninterrupted run.
* logs: ``train_log.csv`` and ``train_log.json`` in ``out_dir`` (step, loss, lr, fpr95,
  pairs/s, seconds, in-batch accuracy), both rewritten atomically.

* data-parallel: launched by ``torchrun --nproc_per_node N -m descmatch train ...`` (the
  environment has ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), :func:`train` joins the process
  group (gloo on the CPU; NCCL on CUDA, device ``cuda:LOCAL_RANK``), wraps the net in
  DistributedDataParallel and each rank takes rows ``rank::world_size`` of every global batch
  (``batch_size`` stays the global batch; the gradients are averaged over the ranks; batch norm
  sees each rank's rows). Rank 0 alone builds pools, validates, logs and writes checkpoints
  and weights; the checkpoint holds every rank's RNG state, so ``resume`` is exact with the
  same number of processes, and every checkpoint checks that the ranks' weights agree. The
  loss and accuracy logged are the ranks' mean. Hardest-in-batch losses see only a rank's rows:
  N processes do not give the same steps as one process.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__ as _version
from ..device import resolve_device
from ..distributed import Dist as _Dist
from ..distributed import launch_env as _launch_env
from ..distributed import local_device, session
from ..errors import ConfigError, InputError, OutputError, TrainingError
from ..nets import NETS, DescriptorNet, build_net, init_central_surround
from ..patches import DEFAULT_MR_SIZE
from ..weights import load_net, save_checkpoint, weights_method
from .brown import BrownDataset
from .evaluation import describe_patches, fpr_at_recall, pair_distances
from .hpatches import build_hpatches_pool_for
from .losses import LOSSES, get_loss
from .multiview import MultiviewPairPool, build_multiview_pool_for
from .photos import PhotoPairConfig
from .pool import (
    SAMPLERS,
    MixedBatches,
    PairPool,
    build_photo_pool_for,
    frames_settings,
    is_pool,
)

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]

#: Default loss, optimiser, learning rate and weight decay of each method.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2net": {"loss": "l2net", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "l2net-cs": {"loss": "l2net", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "hardnet": {"loss": "hardnet", "optimizer": "sgd", "lr": 10.0, "weight_decay": 1e-4},
    "sosnet": {"loss": "sosnet", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "sosnet-cs": {"loss": "sosnet", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
}
#: Learning rate of an optimiser chosen against the method's default.
OPTIMIZER_LR = {"sgd": 10.0, "adam": 1e-3, "adamw": 1e-3}
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DATA_KINDS = ("photos", "pool", "brown", "multiview", "hpatches")
CHECKPOINT = "checkpoint.pt"
LOG_CSV = "train_log.csv"
LOG_JSON = "train_log.json"
LOG_COLUMNS = ("step", "loss", "lr", "fpr95", "pairs_per_s", "seconds", "batch_acc")
#: Collective timeout of data-parallel runs: rank 0 may build pools while the others wait.


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
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoints and logs).

    ``loss``, ``optimizer``, ``lr`` and ``weight_decay`` left None take the method's defaults
    (:data:`METHOD_DEFAULTS`). ``eval_every`` None: once per epoch over the training points.
    ``val``: None holds out ``val_fraction`` of the first source's photos; ``"none"`` skips
    validation. ``time_limit_s`` stops early (checkpoint and weights written) after that much
    training time in this call. ``command`` is recorded in the weights' meta. ``sampler``
    (one of :data:`~descmatch.train.pool.SAMPLERS`) with ``p1_fraction`` (progressive) and
    ``mine_every``, ``mine_points``, ``mine_group`` (hard-negative; None: one group per batch)
    composes the batches. ``init`` (a weights file or shipped name of the same method) starts
    the net from trained weights instead of random ones (fine-tuning). ``max_tilt`` > 1 adds
    random camera tilts up to that factor to the homographies of photo sources;
    ``pair_max_angle`` (degrees) and ``pair_max_scale`` (size ratio) bound how far the frames
    of a detected photo or HPatches pair may disagree
    (:class:`~descmatch.train.photos.PhotoPairConfig`). ``rank``/``world_size`` are set from the
    environment under torchrun.
    """

    method: str = "hardnet"
    data: list[str | DataSpec] = field(default_factory=list)
    out_dir: Path = Path("runs/train")
    loss: str | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 10000
    batch_size: int = 512
    images_per_batch: int = 4
    optimizer: str | None = None
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    augment: bool = True
    flip_rot90: bool = True
    rotation_jitter: float = 5.0
    scale_jitter: float = 0.05
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 500
    eval_every: int | None = None
    log_every: int = 20
    val: str | None = None
    val_fraction: float = 0.05
    val_pairs: int = 5000
    eval_batch_size: int = 1024
    resume: bool = False
    time_limit_s: float | None = None
    mr_size: float = DEFAULT_MR_SIZE
    pairs_per_image: int = 512
    pool_workers: int = 1
    max_images: int | None = None
    sampler: str = "same-image"
    p1_fraction: float = 0.5
    mine_every: int = 1000
    mine_points: int = 32768
    mine_group: int | None = 64
    net_conf: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    frames: str | None = None
    max_tilt: float = 1.0
    pair_max_angle: float = 30.0
    pair_max_scale: float = 1.2
    command: str = ""
    rank: int = 0
    world_size: int = 1

    def resolved(self) -> dict[str, Any]:
        """The effective loss and optimiser settings (method defaults filled in)."""
        if self.method not in NETS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(NETS)}")
        d = METHOD_DEFAULTS[self.method]
        opt = (self.optimizer or d["optimizer"]).lower()
        if opt not in OPTIMIZER_LR:
            raise ConfigError(f"unknown optimizer {opt!r}; valid: {', '.join(OPTIMIZER_LR)}")
        same = opt == d["optimizer"]
        lr = self.lr if self.lr is not None else (d["lr"] if same else OPTIMIZER_LR[opt])
        wd = (
            self.weight_decay
            if self.weight_decay is not None
            else (d["weight_decay"] if same else 0.0)
        )
        loss = self.loss or d["loss"]
        get_loss(loss)
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown lr schedule {self.lr_schedule!r}; valid: {', '.join(SCHEDULES)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}"
            )
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        return {"loss": loss, "optimizer": opt, "lr": float(lr), "weight_decay": float(wd)}

    def photo_conf(self) -> PhotoPairConfig:
        """How photo (and HPatches) pairs are made."""
        return PhotoPairConfig(
            max_tilt=self.max_tilt,
            max_angle_diff=self.pair_max_angle,
            max_size_ratio=self.pair_max_scale,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "data":
                v = [str(DataSpec.parse(s)) for s in v]
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return json.loads(json.dumps(out, default=str))


# --------------------------------------------------------------------------------------------
# Batches on the device


def augment_pairs(
    x: Tensor,
    gen: torch.Generator,
    flip_rot90: bool = True,
    rotation_jitter: float = 5.0,
    scale_jitter: float = 0.05,
) -> Tensor:
    """Augment a batch of pairs: the same random horizontal flip and 90-degree rotation for
    both patches of a pair (they keep corresponding), then an independent rotation uniform in
    ``+-rotation_jitter`` degrees and a scale log-uniform in ``1/(1+s) .. 1+s`` for every patch.
    All of it is one affine map per patch and one ``grid_sample`` (bilinear, reflected border;
    flips and quarter turns alone land on pixel centres). Random numbers come from ``gen`` (a
    CPU generator), so a step's augmentation does not depend on the device.

    Shape: (B,2,P,P) float -> (B,2,P,P) float.
    """
    b, two, p, _ = x.shape
    if not flip_rot90 and rotation_jitter <= 0 and scale_jitter <= 0:
        return x
    n = b * two
    eye = torch.eye(2).expand(b, 2, 2)
    d = eye
    if flip_rot90:
        quarter = torch.randint(0, 4, (b,), generator=gen).double() * (math.pi / 2)
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
        c, s = torch.cos(quarter).round().float(), torch.sin(quarter).round().float()
        d = torch.stack([torch.stack([c * flip, -s], 1), torch.stack([s * flip, c], 1)], 1)
    d = d.repeat_interleave(two, dim=0)  # (n,2,2): the same for both patches of a pair
    if rotation_jitter > 0 or scale_jitter > 0:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(rotation_jitter)
        sc = torch.exp((torch.rand(n, generator=gen) * 2 - 1) * math.log1p(scale_jitter))
        cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
        j = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        d = j @ d
    theta = torch.cat([d, torch.zeros(n, 2, 1)], 2).to(x.device, x.dtype)
    grid = F.affine_grid(theta, [n, 1, p, p], align_corners=False)
    return F.grid_sample(
        x.reshape(n, 1, p, p), grid, mode="bilinear", padding_mode="reflection", align_corners=False
    ).view(b, two, p, p)


def _step_generator(seed: int, step: int) -> torch.Generator:
    s = int(np.random.default_rng([seed, step, 23]).integers(0, 2**62))
    return torch.Generator().manual_seed(s)


# --------------------------------------------------------------------------------------------
# Data sources and validation


@dataclass
class ValSet:
    """Verification pairs. Shape: patches (M,P,P) uint8; idx0, idx1 (L,) int64; is_match (L,)."""

    name: str
    patches: np.ndarray
    idx0: np.ndarray
    idx1: np.ndarray
    is_match: np.ndarray


def _fit_pool(
    pool: PairPool, net_cls: type[DescriptorNet], config: TrainConfig, mr_sizes: list[float]
) -> PairPool:
    """Check a photo pool fits the net (and crop a 64-px/2x pool for the 32-px nets)."""
    if pool.kind == "brown":
        return pool
    meta = pool.meta
    size, wf = int(meta.get("patch_size", pool.patch_size)), float(meta.get("window_factor", 1))
    mr_sizes.append(float(meta.get("mr_size", config.mr_size)))
    p, nwf = net_cls.patch_size, float(net_cls.window_factor)
    if size == p and wf == nwf:
        return pool
    if size == 2 * p and wf == 2 * nwf:
        return pool.center_crop(p)
    raise ConfigError(
        f"{pool.name}: pool patches are {size} px with window factor {wf:g}; "
        f"{net_cls.name} needs {p} px with window factor {nwf:g} (build the pool "
        "for it)"
    )


def _open_source(
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
        return _fit_pool(PairPool.load(spec.path), net_cls, config, mr_sizes)
    if spec.kind == "photos":
        if not spec.path.is_dir():
            raise InputError(f"{spec.path}: no such photo folder")

        def cb(i: int, n: int, msg: str) -> None:
            if progress:
                progress(i, n, f"pool {spec.path.name}: {msg}")

        out = build_photo_pool_for(
            spec.path,
            Path(config.out_dir) / "pools",
            net_cls.patch_size,
            config.mr_size,
            net_cls.window_factor,
            config.pairs_per_image,
            config.seed,
            config.pool_workers,
            cb,
            conf=config.photo_conf(),
            max_images=config.max_images,
            frames=config.frames,
        )
        return _fit_pool(PairPool.load(out), net_cls, config, mr_sizes)
    if spec.kind == "multiview":
        if is_pool(spec.path):
            out = spec.path
        else:

            def cb_mv(i: int, n: int, msg: str) -> None:
                if progress:
                    progress(i, n, f"multiview pool: {msg}")

            out = build_multiview_pool_for(
                spec.path,
                Path(config.out_dir) / "pools",
                net_cls.patch_size,
                config.mr_size,
                net_cls.window_factor,
                config.seed,
                cb_mv,
                frames=config.frames,
            )
        return _fit_pool(MultiviewPairPool.load(out), net_cls, config, mr_sizes)
    if spec.kind == "hpatches":
        if is_pool(spec.path):
            out = spec.path
        else:

            def cb_hp(i: int, n: int, msg: str) -> None:
                if progress:
                    progress(i, n, f"hpatches pool: {msg}")

            out = build_hpatches_pool_for(
                spec.path,
                Path(config.out_dir) / "pools",
                net_cls.patch_size,
                config.mr_size,
                net_cls.window_factor,
                config.pairs_per_image,
                config.seed,
                cb_hp,
                conf=config.photo_conf(),
            )
        return _fit_pool(PairPool.load(out), net_cls, config, mr_sizes)
    raise ConfigError(f"unknown data kind {spec.kind!r}; valid: {', '.join(DATA_KINDS)}")


def _brown_val(path: Path, patch_size: int, max_pairs: int, seed: int) -> ValSet:
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


def _pool_val(pool: PairPool, num_points: int, seed: int, name: str) -> ValSet:
    patches, idx0, idx1, is_match = pool.verification_set(num_points, seed)
    return ValSet(name, patches, idx0, idx1, is_match)


# --------------------------------------------------------------------------------------------
# Logs and hardware


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    model = model or platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_logs(out_dir: Path, rows: list[dict[str, Any]], header: dict[str, Any]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in LOG_COLUMNS})
    _atomic_write(out_dir / LOG_CSV, buf.getvalue())
    _atomic_write(out_dir / LOG_JSON, json.dumps({**header, "rows": rows}, indent=1))


def read_log(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``train_log.json`` (empty when there is none)."""
    p = Path(out_dir) / LOG_JSON
    if not p.is_file():
        return []
    return list(json.loads(p.read_text()).get("rows", []))


# --------------------------------------------------------------------------------------------
# Training


def _autocast(device: torch.device, precision: str) -> tuple[Any, torch.dtype | None]:
    """The autocast dtype for this device and precision setting (None: fp32)."""
    if precision == "fp32":
        return None, None
    if device.type == "cuda":
        if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
            return "cuda", torch.bfloat16
        return "cuda", torch.float16
    if precision == "fp16":
        raise ConfigError("fp16 training needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision == "bf16":
        return "cpu", torch.bfloat16
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        ok = False
    return ("cpu", torch.bfloat16) if ok else (None, None)


def _lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    total = max(total, 1)
    if schedule == "linear":
        f = max(0.0, 1.0 - step / total)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    else:
        f = 1.0
    return w * f


def _make_optimizer(
    net: torch.nn.Module, method: str, opt: str, lr: float, wd: float, momentum: float
) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if opt == "sgd":
        # HardNet's official optimiser has dampening 0.9 with its momentum 0.9.
        damp = 0.9 if method == "hardnet" else 0.0
        return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=damp, weight_decay=wd)
    if opt == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


class _Evaluator:
    def __init__(
        self, val: ValSet | None, device: torch.device, amp: tuple[Any, Any], batch_size: int
    ) -> None:
        self.val, self.device, self.amp, self.batch_size = val, device, amp, batch_size

    def __call__(self, net: torch.nn.Module) -> float | None:
        if self.val is None:
            return None
        v = self.val
        dev_type, dtype = self.amp
        ctx = (
            torch.autocast(dev_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        )
        with ctx:
            desc = describe_patches(net, v.patches, self.device, self.batch_size)
        return fpr_at_recall(pair_distances(desc, v.idx0, v.idx1), v.is_match, 0.95)


class _Features(nn.Module):
    """``forward`` is the net's ``forward_features``: what DistributedDataParallel wraps (its
    gradient hooks need the call to go through its own forward)."""

    def __init__(self, net: DescriptorNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.net.forward_features(x)


def _weights_digest(net: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for v in net.parameters():
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(config: TrainConfig, progress: Progress | None = None) -> Path:
    """Train ``config.method`` on ``config.data``; return ``<out_dir>/<method>.pt``.

    ``progress(step, steps, text)`` is called after every step (and while a photo pool is
    built). See the module docstring for what is done and written. Under torchrun (``RANK``,
    ``WORLD_SIZE`` > 1, ``LOCAL_RANK`` in the environment) this process joins the process group
    (made here and destroyed at the end unless it already existed) and trains its share of
    every batch; only rank 0 calls ``progress`` and writes.
    """
    env = _launch_env()
    device = resolve_device(config.device)
    if env is None:
        return _train(config, progress, device, _Dist(config.rank, config.world_size))
    device = local_device(device)
    with session(device) as d:
        return _train(
            replace(config, rank=d.rank, world_size=d.world_size),
            progress if d.main else None,
            device,
            d,
        )


def _train(config: TrainConfig, progress: Progress | None, device: torch.device, d: _Dist) -> Path:
    t_setup = time.perf_counter()
    opts = config.resolved()
    if not config.data:
        raise ConfigError("no training data: give at least one data source")
    if config.steps < 1 or config.batch_size < 2:
        raise ConfigError("steps must be >= 1 and batch_size >= 2")
    if d.active and config.batch_size < 2 * d.world_size:
        raise ConfigError(
            f"batch size {config.batch_size} is too small for {d.world_size} "
            "processes (at least 2 pairs each)"
        )
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.is_file() and not config.resume:
        raise OutputError(
            f"{out_dir}: holds a training run ({CHECKPOINT}); resume it or choose another folder"
        )
    amp = _autocast(device, config.precision)
    net_cls = NETS[config.method]

    # Data (pools are built by rank 0 while the others wait, then opened by all).
    if not d.main:
        d.barrier()
    specs = [DataSpec.parse(s) for s in config.data]
    mr_sizes: list[float] = []
    pools = [_open_source(s, net_cls, config, mr_sizes, progress) for s in specs]
    if len({round(m, 6) for m in mr_sizes}) > 1:
        raise ConfigError(f"data sources were cut with different mr_size: {sorted(mr_sizes)}")
    mr_size = mr_sizes[0] if mr_sizes else config.mr_size
    val: ValSet | None = None
    val_spec = (config.val or "").strip()
    if val_spec.lower() == "none":
        pass
    elif val_spec:
        if d.main:
            vs = DataSpec.parse(val_spec)
            if vs.kind == "brown":
                val = _brown_val(vs.path, net_cls.patch_size, config.val_pairs, config.seed)
            else:
                vpool = _open_source(vs, net_cls, config, [], progress)
                val = _pool_val(vpool, config.val_pairs, config.seed, str(vs))
    else:
        train_part, held = pools[0].split(config.val_fraction, config.seed)
        pools[0] = train_part
        if d.main:
            val = _pool_val(
                held, config.val_pairs, config.seed, f"{len(held)} held-out points of {specs[0]}"
            )
    if d.active and d.main:
        d.barrier()
    batches = MixedBatches(
        pools,
        [s.weight for s in specs],
        config.batch_size,
        config.images_per_batch,
        config.seed,
        config.rank,
        config.world_size,
        sampler=config.sampler,
        p1_fraction=config.p1_fraction,
        mine_every=config.mine_every,
        mine_points=config.mine_points,
        mine_group=config.mine_group,
    )
    train_points = sum(p.num_points for p, s in zip(pools, specs, strict=True) if s.weight > 0)
    eval_every = (
        config.eval_every
        if config.eval_every is not None
        else max(1, -(-train_points // config.batch_size))
    )
    data_desc = "; ".join(f"{s} ({p.num_points} points)" for s, p in zip(specs, pools, strict=True))

    # Net, optimiser, schedule.
    torch.manual_seed(config.seed)
    net = build_net(config.method, config.net_conf).to(device)
    init_info: dict[str, Any] | None = None
    if config.init and not (config.resume and ckpt_path.is_file()):
        # A central-surround net also starts from its plain net's weights (both towers).
        plain = getattr(NETS[config.method], "plain", "")
        source = (
            plain
            if plain and weights_method(config.init, config.method) == plain
            else config.method
        )
        loaded = load_net(source, config.init)
        init_mr = float(loaded.meta.get("mr_size", mr_size))
        if abs(init_mr - mr_size) > 1e-6:
            raise ConfigError(
                f"{loaded.path}: trained on patches with mr_size {init_mr:g}, the "
                f"data is cut with {mr_size:g}"
            )
        if source == config.method:
            net = loaded.net
        else:
            init_central_surround(net, loaded.net)  # type: ignore[arg-type]
        net = net.to(device).train()
        init_info = {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "steps": loaded.meta.get("steps"),
            "pairs_seen": loaded.meta.get("pairs_seen"),
        }
    optimizer = _make_optimizer(
        net, config.method, opts["optimizer"], opts["lr"], opts["weight_decay"], config.momentum
    )
    total = config.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, total, config.lr_schedule, config.warmup_steps)
    )
    scaler = torch.amp.GradScaler("cuda") if amp[1] == torch.float16 else None
    loss_fn = get_loss(opts["loss"])
    loss_kw = dict(config.loss_options)
    random_loss = opts["loss"] in ("contrastive", "triplet")

    start, elapsed = 0, 0.0
    rows: list[dict[str, Any]] = []
    last_fpr: float | None = None
    if config.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("method") != config.method:
            raise ConfigError(f"{ckpt_path}: a {ck.get('method')} run, not {config.method}")
        net = build_net(config.method, ck.get("conf")).to(device)
        net.load_state_dict(ck["state_dict"])
        optimizer = _make_optimizer(
            net, config.method, opts["optimizer"], opts["lr"], opts["weight_decay"], config.momentum
        )
        optimizer.load_state_dict(ck["optimizer"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: _lr_factor(s, total, config.lr_schedule, config.warmup_steps)
        )
        scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        start, elapsed = int(ck["step"]), float(ck.get("elapsed", 0.0))
        last_fpr = ck.get("meta", {}).get("val_fpr95")
        init_info = ck.get("meta", {}).get("init")
        rng_state = ck["rng"]
        ranks = rng_state.get("ranks")
        if d.active and ranks and len(ranks) == d.world_size:
            rng_state = ranks[d.rank]
        elif d.active or ranks:
            log.warning(
                "%s: saved by %d process(es), resumed by %d: the random streams of "
                "the ranks differ from an uninterrupted run",
                ckpt_path,
                len(ranks) if ranks else 1,
                d.world_size if d.active else 1,
            )
        torch.set_rng_state(rng_state["torch"])
        if device.type == "cuda" and rng_state.get("cuda") is not None:
            torch.cuda.set_rng_state(rng_state["cuda"], device)
        batches.load_mining_state(ck.get("sampler_state"))
        rows = [r for r in read_log(out_dir) if r["step"] <= start]
        log.info("resuming %s at step %d", out_dir, start)
        # Reapply the schedule at this step (a resumed run may have a new number of steps).
        for g, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            g["lr"] = base * _lr_factor(start, total, config.lr_schedule, config.warmup_steps)

    features: nn.Module = _Features(net)
    if d.active:
        from torch.nn.parallel import DistributedDataParallel

        features = DistributedDataParallel(
            features, device_ids=[device.index] if device.type == "cuda" else None
        )

    evaluator = _Evaluator(val, device, amp, config.eval_batch_size)
    hardware = hardware_name(device) + (f" x {d.world_size} processes" if d.active else "")
    header = {
        "config": config.to_dict(),
        "resolved": opts,
        "data": data_desc,
        "val": val.name if val else None,
        "hardware": hardware,
        "precision": str(amp[1]).replace("torch.", "") if amp[1] else "fp32",
        "eval_every": eval_every,
    }
    log.info("setup %.1f s: %s", time.perf_counter() - t_setup, data_desc)

    def meta(step: int) -> dict[str, Any]:
        return {
            "data": data_desc,
            "data_sources": [str(s) for s in specs],
            "steps": step,
            "batch_size": config.batch_size,
            "images_per_batch": config.images_per_batch,
            "sampler": config.sampler,
            "world_size": d.world_size if d.active else 1,
            "pairs_seen": step * config.batch_size,
            **opts,
            "wall_time_s": round(elapsed, 1),
            "hardware": header["hardware"],
            "precision": header["precision"],
            "val_fpr95": last_fpr,
            "val_set": header["val"],
            "headline": (f"val FPR95 {last_fpr:.4f}" if last_fpr is not None else ""),
            "mr_size": mr_size,
            "patch_size": net_cls.patch_size,
            "seed": config.seed,
            "command": config.command,
            "descmatch_version": _version,
            **({"init": init_info} if init_info else {}),
            **(
                {"frames": str(config.frames), **frames_settings(config.frames)}
                if config.frames
                else {}
            ),
        }

    def save_training(step: int) -> None:
        """Write the checkpoint (rank 0); in a data-parallel run every rank takes part: the
        ranks' RNG states are gathered and their weights checked to agree."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        if d.active:
            got = d.gather({"rng": rng, "digest": _weights_digest(net)})
            if len({g["digest"] for g in got}) > 1:
                raise TrainingError(
                    f"step {step}: the weights of the {d.world_size} ranks "
                    "differ (data-parallel training went out of step)"
                )
            rng = {**rng, "ranks": [g["rng"] for g in got]}
        if d.main:
            save_checkpoint(
                ckpt_path,
                net,
                meta(step),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict() if scaler is not None else None,
                step=step,
                elapsed=elapsed,
                rng=rng,
                config=config.to_dict(),
                sampler_state=batches.mining_state(),
            )

    def describe_for_mining(patches: np.ndarray) -> np.ndarray:
        """Descriptors with the current net (eval mode, as validation), each rank describing
        its share of the patches and all of them gathered. Shape: (N,P,P) -> (N,D) float32."""
        n = len(patches)
        if d.active:
            per = -(-n // d.world_size)
            patches = patches[d.rank * per : (d.rank + 1) * per]
        ctx = (
            torch.autocast(amp[0], dtype=amp[1]) if amp[1] is not None else contextlib.nullcontext()
        )
        with ctx:
            desc = describe_patches(net, patches, device, config.eval_batch_size)
        if not d.active:
            return desc
        buf = torch.zeros(per, net.dim, device=device)
        buf[: len(desc)] = torch.from_numpy(desc).to(device)
        parts = [torch.empty_like(buf) for _ in range(d.world_size)]
        dist.all_gather(parts, buf)
        return torch.cat(parts)[:n].cpu().numpy()

    p = net_cls.patch_size

    def train_step(batch: np.ndarray, step: int) -> tuple[float, float]:
        gen = _step_generator(config.seed, step)
        x = torch.from_numpy(batch).to(device, non_blocking=True).float().div_(255.0)
        if config.augment:
            x = augment_pairs(
                x, gen, config.flip_rot90, config.rotation_jitter, config.scale_jitter
            )
        b = x.shape[0]
        inp = x.transpose(0, 1).reshape(2 * b, 1, p, p)
        ctx = (
            torch.autocast(amp[0], dtype=amp[1]) if amp[1] is not None else contextlib.nullcontext()
        )
        with ctx:
            desc, feats = features(inp)
        desc = desc.float()
        a, pos = desc[:b], desc[b:]
        if opts["loss"] == "l2net":
            loss = loss_fn(a, pos, [f[:b].float() for f in feats], [f[b:].float() for f in feats])
        elif random_loss:
            loss = loss_fn(a, pos, generator=gen, **loss_kw)
        else:
            loss = loss_fn(a, pos, **loss_kw)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"step {step}: the loss is {loss.item()}; lower the learning "
                f"rate (now {optimizer.param_groups[0]['lr']:g})"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            acc = (torch.mm(a, pos.t()).argmax(1) == torch.arange(b, device=a.device)).float()
        if d.active:
            both = d.mean(torch.stack([loss.detach().float(), acc.mean()]))
            return float(both[0].item()), float(both[1].item())
        return float(loss.item()), float(acc.mean().item())

    net.train()
    features.train()
    step = start
    t_run = time.perf_counter()
    interval_loss, interval_acc, interval_n, interval_t = 0.0, 0.0, 0, 0.0
    with ThreadPoolExecutor(1) as prefetch:

        def fetch(s: int) -> Future[tuple[np.ndarray, int]] | None:
            # A batch of a new mining round waits for the mining (after the step before it).
            if s >= total or batches.needs_mining(s):
                return None
            return prefetch.submit(batches.batch, s)

        nxt = fetch(step)
        while step < total:
            t0 = time.perf_counter()  # step time includes waiting for data, not evaluation
            if nxt is None:
                if batches.needs_mining(step):
                    batches.mine(step, describe_for_mining)
                    log.info(
                        "step %d: mined hard negatives in %.1f s", step, time.perf_counter() - t0
                    )
                nxt = prefetch.submit(batches.batch, step)
            batch, _src = nxt.result()
            nxt = fetch(step + 1)
            loss_v, acc_v = train_step(batch, step)
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            interval_t += dt
            interval_loss += loss_v
            interval_acc += acc_v
            interval_n += 1
            stop = config.time_limit_s is not None and d.any(
                time.perf_counter() - t_run >= config.time_limit_s, device
            )
            is_last = step == total or stop
            fpr = None
            if val is not None and (step % eval_every == 0 or is_last):
                fpr = evaluator(net)
                net.train()
                last_fpr = fpr
            if d.main and (step % config.log_every == 0 or is_last or fpr is not None):
                n_rows = interval_n * len(batch) * (d.world_size if d.active else 1)
                rows.append(
                    {
                        "step": step,
                        "loss": round(interval_loss / interval_n, 6),
                        "lr": optimizer.param_groups[0]["lr"],
                        "fpr95": fpr,
                        "pairs_per_s": round(n_rows / max(interval_t, 1e-9), 1),
                        "seconds": round(elapsed, 2),
                        "batch_acc": round(interval_acc / interval_n, 4),
                    }
                )
                _write_logs(out_dir, rows, header)
                interval_loss, interval_acc, interval_n, interval_t = 0.0, 0.0, 0, 0.0
            if step % config.checkpoint_every == 0 or is_last:
                save_training(step)
            if progress:
                text = f"loss {loss_v:.4f}" + (
                    f" fpr95 {last_fpr:.4f}" if last_fpr is not None else ""
                )
                progress(step, total, text)
            if stop:
                log.info("time limit reached at step %d", step)
                break
        if nxt is not None:
            nxt.cancel()
    if step == start:  # nothing to do (resumed a finished run): refresh the weights' meta
        last_fpr = evaluator(net) if val is not None else last_fpr
        save_training(step)
        if d.main:
            _write_logs(out_dir, rows, header)
    net.eval()
    path = out_dir / f"{config.method}.pt"
    if d.main:
        save_checkpoint(path, net, meta(step))
    d.barrier()
    return path


def default_loss(method: str) -> str:
    """The loss a method trains with by default."""
    return str(METHOD_DEFAULTS[method]["loss"])


__all__: Sequence[str] = [
    "TrainConfig",
    "DataSpec",
    "METHOD_DEFAULTS",
    "LOSSES",
    "train",
    "augment_pairs",
    "hardware_name",
    "read_log",
    "TrainingError",
    "default_loss",
]
