"""The frame refiner's losses and validation (see :mod:`.frames`): the covariant loss of
refined frames under the pair's local geometry, patches re-cut in refined frames for a
frozen descriptor teacher, and the shares of pairs whose frames disagree."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets.frames import FrameNet
from ..nets.l2net import CentralSurround
from .framepool import CONTEXT, FIELDS
from .losses import distance_matrix, hardnet_loss


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
    net: nn.Module,
    b: dict[str, Tensor],
    device: torch.device,
    refine: bool = True,
    autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
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
        with autocast():
            outs = [net(inp[i : i + CHUNK]) for i in range(0, len(inp), CHUNK)]
        theta = torch.cat([o[0] for o in outs]).float()
        rho = torch.cat([o[1] for o in outs]).float()
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
        pooled = torch.stack(
            [_teacher_descriptors(teacher, ctx, theta, rho + math.log(f)) for f in size_pool]
        ).sum(0)
        return F.normalize(pooled, dim=1)
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
            n_lo = len(lo)
            zero = torch.zeros_like(theta)
            d0 = _teacher_descriptors(teacher, ctx, zero, zero, teacher_size_pool)
            d = _teacher_descriptors(teacher, ctx, theta, rho, teacher_size_pool)
            acc["m0"].append(mutual_nn_share(d0[:n_lo], d0[n_lo:]).cpu())
            acc["m"].append(mutual_nn_share(d[:n_lo], d[n_lo:]).cpu())
            acc["ld"].append(hardnet_loss(d[:n_lo], d[n_lo:]).reshape(1).cpu())
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
