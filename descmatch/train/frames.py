"""Training the keypoint frame refiner (:class:`~descmatch.nets.frames.FrameNet`):
``descmatch train --method frames``.

Data: photo pairs made as for the descriptors (:func:`~descmatch.train.photos.photo_pairs`: a
random homography with camera tilt, photometric change, SIFT keypoints detected in both
images and paired when they agree in position), each pair kept with the detector's two
frames and the homography's Jacobian at the source keypoint. Every photo source gives one
pool, a compressed ``.npz`` in ``<out>/pools`` named by its settings (reused on resume).
About 5% of the photos (every 20th from the 11th, or the last) make the validation pairs and are not
trained on.

Loss (:func:`frame_losses`): the refined source orientation, mapped through the Jacobian as a
gradient direction, against the refined warp orientation (``1 - cos`` of the angle between
them), plus the squared log ratio of the refined source size, scaled by the local scale, to
the refined warp size; plus the squared batch means of the rotations and log scales
(``mean_weight``), which fixes the one thing the pairs leave free (one rotation or rescaling
of every frame).

With ``--frame-loss descriptor`` (:func:`resample`, AffNet/OriNet's way), the pools keep
each patch with its surround (``CONTEXT`` windows, ``CONTEXT_PX`` pixels), the pair's patches
are re-cut from it in the refined frames (differentiable in the rotation and scale), and a
frozen descriptor net (``--teacher``; a central-surround one from a second pool cut over
twice the context) describes them; the loss is HardNet's
hardest-in-batch margin loss with the negatives held constant (only matching pairs are pulled
together), plus ``covariant_weight`` times the covariant loss. Both objectives add
``mean_weight`` times the squared batch means of the rotations and log scales: negatives held
constant, nothing else stops the teacher from pulling every frame one way (larger windows
bring any pair closer), which would not carry over to other nets. What the teacher cannot tell
apart, the refiner need not fix; what it can, the refiner fixes first.

Validation: the share of held-out pairs whose frames disagree by more than 30 degrees or 1.5x
(the tolerance of ``framed@3`` in ``eval homography``) before and after refinement; with a
teacher, also the share of pairs that are mutual nearest neighbours among 1024.
Checkpoints hold the net, the optimiser, the schedule, the step and the random state:
``--resume`` continues exactly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..describe import check_size_pool
from ..errors import ConfigError, OutputError
from ..geometry import homography_jacobian
from ..nets import NETS
from ..nets.frames import FrameNet
from ..nets.l2net import CentralSurround
from ..patches import DEFAULT_MR_SIZE
from ..weights import load_net, save_checkpoint, weights_method
from .loop import DataSpec
from .losses import distance_matrix, hardnet_loss
from .photos import PhotoPairConfig, load_photo, photo_pairs
from .pool import _select_images

Progress = Any
POOL_FORMAT = 1
FIELDS = ("patches", "a1", "s1", "a2", "s2", "jac")
OBJECTIVES = ("covariant", "descriptor")
#: Descriptor objective: pool patches are CONTEXT_PX wide and span CONTEXT keypoint windows at
#: the net patch's pixel step, so a window up to 1.8x larger, turned by any angle, lies
#: (nearly: 2.55 would be exact) inside, and the central 32x32 is the net's input patch.
CONTEXT = 2.5
CONTEXT_PX = 80


@dataclass
class FramesConfig:
    """A frame-refiner training run (stored in its checkpoints and logs)."""

    data: list[str]
    out_dir: Path
    steps: int = 1500
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    max_tilt: float = 4.0
    pair_angle: float = 75.0
    pair_scale: float = 1.8
    pairs_per_image: int = 300
    max_images: int | None = None
    eval_every: int = 500
    checkpoint_every: int = 500
    resume: bool = False
    time_limit_s: float | None = None
    init: str | None = None
    net_conf: dict[str, Any] = field(default_factory=dict)
    objective: str = "covariant"
    teacher: str | None = None
    covariant_weight: float = 0.0
    mean_weight: float = 1.0
    teacher_size_pool: tuple[float, ...] = (1.0,)
    command: str = ""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.steps < 1 or self.batch_size < 2 or not self.lr > 0:
            raise ConfigError("frames: needs steps >= 1, batch size >= 2 and lr > 0")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--frame-loss {self.objective}: choose one of {', '.join(OBJECTIVES)}"
            )
        if (self.objective == "descriptor") != (self.teacher is not None):
            raise ConfigError(
                "--frame-loss descriptor needs --teacher (the descriptor weights "
                "it trains through), and --teacher needs --frame-loss descriptor"
            )
        if self.covariant_weight and self.objective != "descriptor":
            raise ConfigError("--covariant-weight adds to --frame-loss descriptor")
        if self.covariant_weight < 0 or self.mean_weight < 0:
            raise ConfigError("frames: needs covariant and mean weights >= 0")
        self.teacher_size_pool = check_size_pool(
            tuple(self.teacher_size_pool), "--teacher-size-pool"
        )
        if self.teacher_size_pool != (1.0,) and self.teacher is None:
            raise ConfigError("--teacher-size-pool applies to --frame-loss descriptor")

    @property
    def context(self) -> bool:
        """Whether the pools keep the surround of each patch (the descriptor objective)."""
        return self.objective == "descriptor"


def frame_losses(
    theta1: Tensor,
    rho1: Tensor,
    theta2: Tensor,
    rho2: Tensor,
    a1: Tensor,
    s1: Tensor,
    a2: Tensor,
    s2: Tensor,
    jac: Tensor,
) -> tuple[Tensor, Tensor]:
    """Per-pair orientation and scale disagreement of refined frames.

    ``a1``, ``a2``: the detector's angles (degrees, OpenCV's convention); ``theta``: the net's
    rotations (radians); ``s``: sizes; ``rho``: log scale factors; ``jac``: d(warp)/d(source)
    at the source keypoint. The source direction ``a1 + theta1`` maps as a gradient, by
    ``J^-T`` (so by ``adj(J)^T`` and the sign of ``det J``); its size by ``sqrt|det J|``.

    Shape: (N,) each, jac (N,2,2) -> (N,) ``1 - cos(angle error)``, (N,) squared log size
    ratio.
    """
    t1 = torch.deg2rad(a1) + theta1
    t2 = torch.deg2rad(a2) + theta2
    j = jac
    det = j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0]
    c, s = torch.cos(t1), torch.sin(t1)
    sign = torch.where(det < 0, -1.0, 1.0)
    vx = (j[:, 1, 1] * c - j[:, 1, 0] * s) * sign
    vy = (-j[:, 0, 1] * c + j[:, 0, 0] * s) * sign
    mapped = torch.atan2(vy, vx)
    angle_loss = 1.0 - torch.cos(mapped - t2)
    log_ratio = (
        torch.log(s1) + rho1 + 0.5 * torch.log(det.abs().clamp_min(1e-12)) - torch.log(s2) - rho2
    )
    return angle_loss, log_ratio**2


def _pair_config(cfg: FramesConfig) -> PhotoPairConfig:
    return PhotoPairConfig(
        max_tilt=cfg.max_tilt, max_angle_diff=cfg.pair_angle, max_size_ratio=cfg.pair_scale
    )


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
    cut = {}
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
            dest[k].append(v)
    for val, path in zip((False, True), paths, strict=True):
        if not parts[val]["a1"]:
            raise ConfigError(
                f"{photo_dir}: no {'validation' if val else 'training'} pairs "
                "(too few photos with detected pairs)"
            )
        arrays = {k: np.concatenate(v) for k, v in parts[val].items()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays, settings=json.dumps(settings))
        tmp.replace(path)
    return paths


def _load_pools(paths: list[Path]) -> dict[str, Tensor]:
    data = [np.load(p) for p in paths]
    fields = [k for k in (*FIELDS, "surround") if all(k in d.files for d in data)]
    return {k: torch.from_numpy(np.concatenate([d[k] for d in data])) for k in fields}


#: Patches per net call in training: on the CPU, chunks of 256 run 2.3x faster than one
#: call on 1024 (cache-sized activations); batch norm then sees 256 at a time.
CHUNK = 256
#: Validation pairs per matching group for the descriptor objective's mutual-NN share.
VAL_GROUP = 1024


def _net_input(x: Tensor) -> Tensor:
    """The frame net's patches: the central 32x32 of pool patches (all of 32x32 ones).
    Shape: (N,1,P,P) -> (N,1,32,32)."""
    m = (x.shape[-1] - FrameNet.patch_size) // 2
    return x[..., m : m + FrameNet.patch_size, m : m + FrameNet.patch_size] if m else x


def resample(context: Tensor, theta: Tensor, rho: Tensor, windows: float, size: int) -> Tensor:
    """Patches in refined frames, cut from context patches (``CONTEXT`` windows wide, cut in
    the detector's frames): ``size`` px spanning ``windows`` keypoint windows, turned by
    ``theta`` and scaled by ``exp(rho)``, as :func:`~descmatch.patches.extract_patches` cuts
    them at angle ``a + theta`` and size ``s * exp(rho)`` from the same pyramid level
    (bilinear, border replicated); differentiable in ``theta`` and ``rho``.

    Shape: context (N,1,C,C), theta, rho (N,) -> (N,1,size,size).
    """
    k = (windows / CONTEXT) * torch.exp(rho)
    c, s = torch.cos(theta) * k, torch.sin(theta) * k
    z = torch.zeros_like(k)
    a = torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1)
    grid = F.affine_grid(a, [len(k), 1, size, size], align_corners=False)
    return F.grid_sample(context, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _stack(b: dict[str, Tensor], key: str, device: torch.device) -> Tensor | None:
    """A pair field's patches, sources then warps, in [0,1]. Shape: (N,2,P,P) -> (2N,1,P,P)."""
    if key not in b:
        return None
    p = b[key].to(device).float() / 255.0
    return torch.cat([p[:, 0:1], p[:, 1:2]])


def _batch_losses(
    net: FrameNet, b: dict[str, Tensor], device: torch.device, refine: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor | None]]:
    """Per-pair losses of a batch with the net's refinements (``refine``) or with the
    detector's frames (rotations and log scales 0); also the rotations and log scales of
    the sources then the warps, and the pool patches and surrounds (or None) in that order.
    Shape: -> (N,), (N,), (2N,), (2N,), ((2N,1,P,P), (2N,1,P,P) or None)."""
    x = _stack(b, "patches", device)
    assert x is not None
    n = x.shape[0] // 2
    if refine:
        inp = _net_input(x)
        outs = [net(inp[i : i + CHUNK]) for i in range(0, len(inp), CHUNK)]
        theta = torch.cat([o[0] for o in outs])
        rho = torch.cat([o[1] for o in outs])
    else:
        theta = rho = torch.zeros(2 * n, device=device)
    f = {k: b[k].to(device).float() for k in FIELDS[1:]}
    lo, ls = frame_losses(
        theta[:n], rho[:n], theta[n:], rho[n:], f["a1"], f["s1"], f["a2"], f["s2"], f["jac"]
    )
    return lo, ls, theta, rho, (x, _stack(b, "surround", device))


def _teacher_descriptors(
    teacher: nn.Module,
    ctx: tuple[Tensor, Tensor | None],
    theta: Tensor,
    rho: Tensor,
    size_pool: tuple[float, ...] = (1.0,),
) -> Tensor:
    """The teacher's descriptors of pool patches in the given frames: a central-surround
    teacher's streams from the context and the surround (each cut to 32x32 over one of their
    windows), a plain one's from the context. With ``size_pool`` factors, the normalised sum
    of the descriptors at those factors of the size, as ``--size-pool`` describes.
    Shape: -> (2N,D)."""
    if size_pool != (1.0,):
        return F.normalize(
            sum(_teacher_descriptors(teacher, ctx, theta, rho + math.log(f)) for f in size_pool),
            dim=1,
        )
    x, xs = ctx
    c = resample(x, theta, rho, 1.0, 32)
    if isinstance(teacher, CentralSurround):
        assert xs is not None
        s = resample(xs, theta, rho, 1.0, 32)
        outs = [
            teacher.forward_streams(c[i : i + CHUNK], s[i : i + CHUNK])[0]
            for i in range(0, len(c), CHUNK)
        ]
    else:
        outs = [teacher(c[i : i + CHUNK]) for i in range(0, len(c), CHUNK)]
    return torch.cat(outs)


def mutual_nn_share(d1: Tensor, d2: Tensor) -> Tensor:
    """Per pair: whether row i of ``d1`` and row i of ``d2`` are each other's nearest
    neighbours. Shape: (N,D), (N,D) -> (N,) bool."""
    d = distance_matrix(d1, d2)
    i = torch.arange(len(d1), device=d1.device)
    return (d.argmin(1) == i) & (d.argmin(0) == i)


@torch.no_grad()
def validate(
    net: FrameNet,
    val: dict[str, Tensor],
    device: torch.device,
    teacher: nn.Module | None = None,
    batch: int = VAL_GROUP,
    teacher_size_pool: tuple[float, ...] = (1.0,),
) -> dict[str, float]:
    """Shares of validation pairs whose frames disagree by > 30 degrees or > 1.5x, and
    either, with the detector's frames and the refined ones; mean losses. With a ``teacher``
    descriptor (size-pooled over ``teacher_size_pool``), also the share of pairs that are
    mutual nearest neighbours among groups of ``batch`` pairs (``*_mnn``) and the descriptor
    loss (``val_descriptor_loss``)."""
    was = net.training
    net.eval()
    acc: dict[str, list[Tensor]] = {k: [] for k in ("lo0", "ls0", "lo", "ls", "m0", "m", "ld")}
    n = len(val["a1"])
    for i in range(0, n, batch):
        b = {k: v[i : i + batch] for k, v in val.items()}
        lo, ls, theta, rho, ctx = _batch_losses(net, b, device)
        lo0, ls0, _, _, _ = _batch_losses(net, b, device, refine=False)
        for k, v in (("lo0", lo0), ("ls0", ls0), ("lo", lo), ("ls", ls)):
            acc[k].append(v.cpu())
        if teacher is not None and len(lo) >= 2:
            k = len(lo)
            zero = torch.zeros_like(theta)
            d0 = _teacher_descriptors(teacher, ctx, zero, zero, teacher_size_pool)
            d = _teacher_descriptors(teacher, ctx, theta, rho, teacher_size_pool)
            acc["m0"].append(mutual_nn_share(d0[:k], d0[k:]).cpu())
            acc["m"].append(mutual_nn_share(d[:k], d[k:]).cpu())
            acc["ld"].append(hardnet_loss(d[:k], d[k:]).reshape(1).cpu())
    net.train(was)
    cat = {k: torch.cat(v) for k, v in acc.items() if v}
    cos30, log15 = 1.0 - math.cos(math.radians(30.0)), math.log(1.5) ** 2
    out = {}
    for tag, lo, ls in (("detector", cat["lo0"], cat["ls0"]), ("refined", cat["lo"], cat["ls"])):
        out[f"{tag}_angle_off"] = float((lo > cos30).float().mean())
        out[f"{tag}_scale_off"] = float((ls > log15).float().mean())
        out[f"{tag}_off"] = float(((lo > cos30) | (ls > log15)).float().mean())
    out["val_loss"] = float(cat["lo"].mean() + cat["ls"].mean())
    if "m" in cat:
        out["detector_mnn"] = float(cat["m0"].float().mean())
        out["refined_mnn"] = float(cat["m"].float().mean())
        out["val_descriptor_loss"] = float(cat["ld"].mean())
    return out


def _load_teacher(spec: str, device: torch.device) -> tuple[nn.Module, Path, str]:
    """The frozen descriptor net of the descriptor objective (a file or shipped name of a
    plain or central-surround net) -> (net, path, sha256)."""
    method = weights_method(spec, "sosnet")
    if method is None or method not in NETS:
        raise ConfigError(f"--teacher {spec}: not descmatch descriptor weights")
    loaded = load_net(method, spec)
    net = loaded.net.eval().to(device)
    net.requires_grad_(False)
    return net, loaded.path, loaded.sha256


def _init_from(net: FrameNet, init: FrameNet, spec: str) -> None:
    """Start ``net`` from the frame-refiner ``init`` (read from ``spec``); a scale-only
    refiner starts a rotating one (the rotation output at zero)."""
    state = init.state_dict()
    own = net.state_dict()
    w, b = state["head.weight"], state["head.bias"]
    if w.shape[0] == 1 and own["head.weight"].shape[0] == 2:
        state = {
            **state,
            "head.weight": torch.cat([torch.zeros_like(w), w]),
            "head.bias": torch.cat([torch.zeros_like(b), b]),
        }
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"--init {spec}: does not fit a frame net with {net.conf}") from None


def train_frames(cfg: FramesConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) a frame-refiner training; returns ``<out>/frames.pt``."""
    specs = []
    for d in cfg.data:
        spec = DataSpec.parse(d)
        if spec.kind != "photos":
            raise ConfigError(f"--data {d}: the frame refiner trains on photos: sources only")
        if not spec.path.is_dir():
            raise ConfigError(f"--data {d}: no such folder")
        specs.append(spec.path)
    if not specs:
        raise ConfigError("--data is required (e.g. --data photos:shared/data/photos)")
    out = cfg.out_dir
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not cfg.resume:
        raise OutputError(
            f"{out}: holds a run already; pass --resume to continue it or choose another --out"
        )
    if cfg.resume and not ckpt_path.exists():
        raise OutputError(f"{ckpt_path}: nothing to resume")
    device = torch.device(cfg.device)
    teacher = teacher_info = None
    if cfg.teacher is not None:
        teacher, t_path, t_sha = _load_teacher(cfg.teacher, device)
        teacher_info = {"teacher": str(t_path), "teacher_sha256": t_sha}
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    pools = [
        build_frame_pool(
            p, out / "pools", cfg, progress, surround=isinstance(teacher, CentralSurround)
        )
        for p in specs
    ]
    train = _load_pools([p[0] for p in pools])
    val = _load_pools([p[1] for p in pools])
    n = len(train["a1"])

    init = load_net("frames", cfg.init).net if cfg.init else None
    net = FrameNet({**(init.conf if init else {}), **cfg.net_conf}).to(device)
    if init is not None and not cfg.resume:
        _init_from(net, init, cfg.init)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    step, log_rows, before = 0, [], 0.0
    if cfg.resume:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck["config"]["steps"] != cfg.steps or ck["config"]["data"] != [str(d) for d in cfg.data]:
            raise ConfigError(f"{ckpt_path}: was started with other --steps or --data")
        net.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        step, log_rows = int(ck["step"]), list(ck["log"])
        before = float(ck.get("seconds", 0.0))

    def elapsed() -> float:
        """Training seconds over every invocation of the run."""
        return before + time.perf_counter() - t0

    def meta(metrics: dict[str, float]) -> dict[str, Any]:
        return {
            "data": ", ".join(str(d) for d in cfg.data),
            "steps": step,
            "mr_size": DEFAULT_MR_SIZE,
            "seconds": round(elapsed(), 1),
            "hardware": _hardware(device),
            "pairs": n,
            "command": cfg.command,
            "config": _config_dict(cfg),
            "headline": _headline(metrics),
            "val": metrics,
            **(teacher_info or {}),
        }

    def save(metrics: dict[str, float]) -> None:
        save_checkpoint(
            ckpt_path,
            net,
            meta(metrics),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            generator=gen.get_state(),
            step=step,
            log=log_rows,
            config=_config_dict(cfg),
            seconds=elapsed(),
        )
        _write_logs(out, log_rows)

    t0 = time.perf_counter()
    metrics: dict[str, float] = log_rows[-1] if log_rows else {}
    run_lo = run_ls = run_ld = 0.0
    run_k = 0
    net.train()
    while step < cfg.steps:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        lo, ls, theta, rho, ctx = _batch_losses(net, {k: v[idx] for k, v in train.items()}, device)
        mean = cfg.mean_weight * (theta.mean() ** 2 + rho.mean() ** 2)
        if teacher is None:
            loss = lo.mean() + ls.mean() + mean
        else:
            d = _teacher_descriptors(teacher, ctx, theta, rho, cfg.teacher_size_pool)
            ld = hardnet_loss(d[: len(lo)], d[len(lo) :], constant_negatives=True)
            loss = ld + cfg.covariant_weight * (lo.mean() + ls.mean()) + mean
            run_ld += float(ld.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        run_lo += float(lo.detach().mean())
        run_ls += float(ls.detach().mean())
        run_k += 1
        if progress:
            shown = run_ld if teacher is not None else run_lo + run_ls
            progress(step, cfg.steps, f"loss {shown / run_k:.4f}")
        last = step == cfg.steps
        timed_out = cfg.time_limit_s is not None and time.perf_counter() - t0 > cfg.time_limit_s
        if step % cfg.eval_every == 0 or last or timed_out:
            metrics = {
                "step": step,
                "angle_loss": run_lo / run_k,
                "scale_loss": run_ls / run_k,
                **({"descriptor_loss": run_ld / run_k} if teacher is not None else {}),
                "lr": sched.get_last_lr()[0],
                **validate(net, val, device, teacher, teacher_size_pool=cfg.teacher_size_pool),
                "seconds": elapsed(),
            }
            log_rows.append(metrics)
            run_lo = run_ls = run_ld = 0.0
            run_k = 0
        if step % cfg.checkpoint_every == 0 or last or timed_out:
            save(metrics)
        if timed_out:
            break
    save(metrics)
    return save_checkpoint(out / "frames.pt", net.cpu(), meta(metrics))


def _headline(m: dict[str, float]) -> str:
    nan = float("nan")
    text = (
        f"frames off (>30 deg or >1.5x): detector {m.get('detector_off', nan):.3f} -> "
        f"refined {m.get('refined_off', nan):.3f}"
    )
    if "refined_mnn" in m:
        text += f"; mutual NN: detector {m['detector_mnn']:.3f} -> refined {m['refined_mnn']:.3f}"
    return text


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()})"


def _config_dict(cfg: FramesConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["out_dir"] = str(cfg.out_dir)
    d["data"] = [str(x) for x in cfg.data]
    return d


def _write_logs(out: Path, rows: list[dict[str, float]]) -> None:
    if not rows:
        return
    keys = list(rows[-1].keys())
    tmp = out / "train_log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "train_log.csv")
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out / "train_log.json")
