"""Speed of descmatch's stages on one machine, in one run, next to reference points.

Sections (``--only NAME`` runs one, in this process):
  * descriptors: patches/s of each net (l2net, hardnet, sosnet, l2net-cs) through
    NetDescriber.describe_patches, per batch size and precision (fp32 reference, bf16 where
    the CPU/GPU has it, fp16 on CUDA), as a fraction of the machine's measured torch.mm
    FLOP rate (FLOPs per patch counted from the net's convolutions); kornia's HardNet
    (same weights, plain forward, fp32) next to descmatch's HardNet;
  * patches: build_pyramid + extract_patches for the keypoints of a rendered 1024x768 scene
    (SiftDetector, 8000 keypoints);
  * detect: OpenCV's SIFT detector (CPU) next to descmatch's torch DoG detector on --device
    (the GPU path), on the same 1024x768 scene, 8000 keypoints, and how many agree;
  * matching: match_descriptors (mutual + ratio 0.85; precision auto, i.e. bf16/fp16 with
    float32 re-checks, and fp32) on 4k x 4k and 8k x 8k unit 128-D descriptors next to
    OpenCV's BFMatcher knnMatch(k=2) both ways + numpy mutual/ratio, and the speed-up;
  * extract: descmatch.extract.extract (RootSIFT, a learned net) over 8 rendered 1024x768
    images, 4000 and 8000 keypoints, next to OpenCV SIFT detectAndCompute on the same files.
Without ``--only`` every section runs in its own subprocess (this script again with
``--only``) and a last table gives each one's peak RSS (the child's ru_maxrss, from
os.wait4) and, on CUDA, torch.cuda.max_memory_allocated.

Without ``--weights`` the nets are randomly initialised and put in eval mode: fine for
timing, the descriptors mean nothing. ``--quick`` shrinks every size to a smoke test (one
repetition, one thread): its numbers are not measurements.

    python benchmarks/speed.py [--device cpu|cuda] [--weights PATH] [--only SECTION]
                               [--threads N] [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from descmatch.describe import NetDescriber, SiftDescriber, default_batch_size, resolve_precision
from descmatch.detect import SiftDetector
from descmatch.examples import render_scene
from descmatch.extract import extract
from descmatch.images import ImageList, list_images
from descmatch.match import DEFAULT_RATIO, match_descriptors
from descmatch.nets import NETS, DescriptorNet, build_net
from descmatch.patches import DEFAULT_MR_SIZE, build_pyramid, extract_patches
from descmatch.weights import load_net
from descmatch.weights_import import descmatch_to_foreign

SECTIONS = ("descriptors", "patches", "detect", "matching", "extract")
PEAK_TAG = "@@peak"  # the line a child prints at exit for the parent to parse


@dataclass(frozen=True)
class Sizes:
    batches: tuple[int, ...]
    patches_cpu: int  # patches per timed call (several batches)
    patches_cuda: int
    kornia_batch: int
    mm_n_cpu: int
    mm_n_cuda: int
    image: tuple[int, int]
    keypoints: int  # patches section
    match_n: tuple[int, ...]
    extract_images: int
    extract_keypoints: tuple[int, ...]


FULL = Sizes(
    batches=(256, 1024, 4096),
    patches_cpu=8192,
    patches_cuda=65536,
    kornia_batch=1024,
    mm_n_cpu=4096,
    mm_n_cuda=8192,
    image=(1024, 768),
    keypoints=8000,
    match_n=(4000, 8000),
    extract_images=8,
    extract_keypoints=(4000, 8000),
)
QUICK = Sizes(
    batches=(64, 256),
    patches_cpu=256,
    patches_cuda=256,
    kornia_batch=128,
    mm_n_cpu=256,
    mm_n_cuda=256,
    image=(320, 240),
    keypoints=300,
    match_n=(300, 600),
    extract_images=2,
    extract_keypoints=(200, 400),
)


# -- timing helpers ----------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``reps`` calls after ``warmup`` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def med(times: list[float]) -> float:
    return statistics.median(times)


def fmt(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def table(head: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()


# -- nets and weights --------------------------------------------------------------------------
def load_nets(
    weights: str | None,
) -> tuple[dict[str, DescriptorNet], dict[str, float], str, str | None]:
    """Every registered net: the one ``weights`` is for loaded from it, the others random."""
    nets: dict[str, DescriptorNet] = {}
    mr: dict[str, float] = {}
    note = "none: randomly initialised nets in eval mode (fine for timing; descriptors meaningless)"
    trained = None
    if weights:
        ckpt = torch.load(weights, map_location="cpu", weights_only=True)
        trained = (
            ckpt.get("method", "hardnet")
            if isinstance(ckpt, dict) and ckpt.get("format") == "descmatch"
            else "hardnet"
        )
        loaded = load_net(trained, weights)
        nets[trained] = loaded.net.eval()
        mr[trained] = float(loaded.meta.get("mr_size", DEFAULT_MR_SIZE))
        note = f"{weights} ({trained}); the other nets randomly initialised, eval mode"
    torch.manual_seed(0)
    for name in NETS:
        if name not in nets:
            nets[name] = build_net(name).eval()
            mr[name] = DEFAULT_MR_SIZE
    return nets, mr, note, trained


def conv_flops(net: nn.Module, patch_size: int) -> int:
    """FLOPs (2 x multiply-adds) of the net's convolutions and linear layers for one patch."""
    macs = 0

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            macs += out.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            macs += out.numel() * m.in_features

    hs = [
        m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.inference_mode():
        net.eval()(torch.rand(1, 1, patch_size, patch_size))
    for h in hs:
        h.remove()
    return 2 * macs


def precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["fp32", *(["bf16"] if torch.cuda.is_bf16_supported() else []), "fp16"]
    return ["fp32", *(["bf16"] if resolve_precision("auto", device) == "bf16" else [])]


def mm_peaks(device: torch.device, n: int, reps: int) -> dict[str, float]:
    """Best GFLOP/s of an n x n x n torch.mm per dtype: the machine's practical peak."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    out = {}
    g = torch.Generator(device=device).manual_seed(0)
    for key, dt in dtypes.items():
        a = torch.randn(n, n, device=device, generator=g).to(dt)
        b = torch.randn(n, n, device=device, generator=g).to(dt)
        out[key] = 2 * n**3 / min(bench(lambda a=a, b=b: torch.mm(a, b), device, reps)) / 1e9
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        a = torch.randn(n, n, device=device, generator=g)
        out["tf32"] = 2 * n**3 / min(bench(lambda: torch.mm(a, a), device, reps)) / 1e9
        torch.backends.cuda.matmul.allow_tf32 = old
    return out


def kornia_hardnet(ours: DescriptorNet) -> nn.Module:
    """kornia.feature.HardNet holding our HardNet's weights (same layers, same order)."""
    from kornia.feature import HardNet as KHardNet

    k = KHardNet(pretrained=False)
    k.load_state_dict(descmatch_to_foreign(ours, k.state_dict()), strict=True)
    return k.eval()


# -- sections ----------------------------------------------------------------------------------
def section_descriptors(args: argparse.Namespace, sz: Sizes, device: torch.device) -> None:
    nets, _, _, trained = load_nets(args.weights)
    reps = args.reps
    peaks = mm_peaks(device, sz.mm_n_cuda if device.type == "cuda" else sz.mm_n_cpu, reps)
    n_mm = sz.mm_n_cuda if device.type == "cuda" else sz.mm_n_cpu
    print(f"## Matrix multiply (torch.mm {n_mm}x{n_mm}, best of {reps})\n")
    table(["dtype", "GFLOP/s"], [[k, fmt(v, 1)] for k, v in peaks.items()])
    tf32_conv = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    if tf32_conv:
        print(
            "CUDA fp32 convolutions run in TF32 (torch.backends.cudnn.allow_tf32): their "
            "fraction is of the TF32 peak.\n"
        )

    if "bf16" not in precisions(device):
        print("bf16 left out: this CPU has no native bf16 (oneDNN would emulate it).\n")
    n = sz.patches_cuda if device.type == "cuda" else sz.patches_cpu
    print(
        f"## Descriptor throughput (NetDescriber.describe_patches, {n} random patches per "
        f"call, median of {reps}; best in brackets)\n"
    )
    rows = []
    flops = {name: conv_flops(net, net.patch_size) for name, net in nets.items()}
    g = torch.Generator(device=device).manual_seed(0)
    for name, net in nets.items():
        patches = torch.rand(n, 1, net.patch_size, net.patch_size, device=device, generator=g)
        for prec in precisions(device):
            peak_key = "tf32" if prec == "fp32" and tf32_conv else prec
            for bs in sz.batches:
                d = NetDescriber(net, device, batch_size=bs, precision=prec)
                t = bench(lambda d=d, p=patches: d.describe_patches(p), device, reps)
                rate, best = n / med(t), n / min(t)
                gflops = rate * flops[name] / 1e9
                rows.append(
                    [
                        name,
                        prec,
                        str(bs),
                        f"{fmt(rate)} ({fmt(best)})",
                        fmt(1e3 * med(t) / n * 1000, 1),
                        fmt(flops[name] / 1e6, 1),
                        fmt(gflops, 1),
                        f"{100 * gflops / peaks[peak_key]:.1f}%",
                    ]
                )
    table(
        [
            "net",
            "precision",
            "batch",
            "patches/s",
            "ms / 1000 patches",
            "MFLOP/patch",
            "GFLOP/s",
            "of mm peak",
        ],
        rows,
    )

    bs = sz.kornia_batch
    src = "--weights" if trained == "hardnet" else "random init"
    print(
        f"## HardNet: descmatch vs kornia.feature.HardNet (same weights: {src}; fp32, "
        f"batch {bs}, {n} patches, median of {reps})\n"
    )
    ours = nets["hardnet"]
    kh = kornia_hardnet(ours).to(device)
    d = NetDescriber(ours, device, batch_size=bs, precision="fp32")
    patches = torch.rand(n, 1, 32, 32, device=device, generator=g)

    @torch.inference_mode()
    def kornia_fwd() -> torch.Tensor:
        return torch.cat([kh(patches[i : i + bs]) for i in range(0, n, bs)])

    with torch.inference_mode():
        diff = (kornia_fwd() - d.describe_patches(patches)).abs().max().item()
    rows = []
    for label, fn in (
        ("descmatch NetDescriber (BN folded)", lambda: d.describe_patches(patches)),
        ("kornia HardNet (plain forward, inference_mode)", kornia_fwd),
    ):
        t = bench(fn, device, reps)
        rate = n / med(t)
        gflops = rate * flops["hardnet"] / 1e9
        peak = peaks["tf32" if tf32_conv else "fp32"]
        rows.append(
            [
                label,
                f"{fmt(rate)} ({fmt(n / min(t))})",
                fmt(gflops, 1),
                f"{100 * gflops / peak:.1f}%",
            ]
        )
    table(["implementation", "patches/s", "GFLOP/s", "of fp32 mm peak"], rows)
    print(
        f"max |kornia - descmatch| descriptor difference: {diff:.2e} (kornia's "
        "standardisation eps differs)\n"
    )


def scene(sz: Sizes, seed: int = 0) -> np.ndarray:
    return render_scene(*sz.image, seed=seed).astype(np.float32) / 255.0


def section_patches(args: argparse.Namespace, sz: Sizes, device: torch.device) -> None:
    img = scene(sz)
    det = SiftDetector(max_keypoints=sz.keypoints)
    t_det = med(bench(lambda: det(img), torch.device("cpu"), args.reps))
    kps = det(img)
    timg = torch.from_numpy(img).to(device)
    w, h = sz.image
    print(
        f"## Patch extraction (build_pyramid + extract_patches, {w}x{h} rendered scene, "
        f"{len(kps)} SiftDetector keypoints, median of {args.reps})\n"
    )
    rows = []
    with torch.inference_mode():
        t_pyr = med(bench(lambda: build_pyramid(timg), device, args.reps))
        for p, wf, label in (
            (32, 1.0, "32x32 (l2net, hardnet, sosnet)"),
            (64, 2.0, "64x64, 2x window (l2net-cs)"),
        ):

            def run(p: int = p, wf: float = wf) -> torch.Tensor:
                return extract_patches(
                    timg,
                    kps.xy,
                    kps.size,
                    kps.angle,
                    p,
                    DEFAULT_MR_SIZE,
                    wf,
                    pyramid=build_pyramid(timg),
                )

            t = bench(run, device, args.reps)
            rows.append(
                [
                    label,
                    str(len(kps)),
                    fmt(1e3 * med(t), 1),
                    fmt(len(kps) / med(t)),
                    fmt(len(kps) / min(t)),
                ]
            )
    table(["patches", "keypoints", "ms / image", "patches/s", "best patches/s"], rows)
    from descmatch.patches import _remap_is_exact  # the CPU sampler's own check

    sampler = "cv2.remap" if device.type == "cpu" and _remap_is_exact() else "grid_sample"
    print(
        f"of which build_pyramid: {1e3 * t_pyr:.1f} ms; patches sampled with {sampler} "
        f"(all pyramid levels in one atlas image); for scale, SiftDetector on the same "
        f"image (CPU): {1e3 * t_det:.0f} ms\n"
    )


def unit_descriptors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random unit 128-D descriptors; half of desc1 are noisy copies of desc0 rows (so that
    the matchers find something), the rest independent."""
    rng = np.random.default_rng(seed)
    d0 = rng.standard_normal((n, 128)).astype(np.float32)
    d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
    d1 = rng.standard_normal((n, 128)).astype(np.float32)
    d1 /= np.linalg.norm(d1, axis=1, keepdims=True)
    half = n // 2
    src = rng.permutation(n)[:half]
    d1[:half] = d0[src] + 0.05 * rng.standard_normal((half, 128)).astype(np.float32)
    d1 /= np.linalg.norm(d1, axis=1, keepdims=True)
    return d0, d1[rng.permutation(n)]


def opencv_match(d0: np.ndarray, d1: np.ndarray, ratio: float) -> np.ndarray:
    """What a user would write: knnMatch(k=2) both ways, ratio and mutual check in numpy."""
    bf = cv2.BFMatcher(cv2.NORM_L2)

    def nn2(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        knn = bf.knnMatch(a, b, k=2)
        arr = np.array([(m[0].trainIdx, m[0].distance, m[1].distance) for m in knn], np.float64)
        return arr[:, 0].astype(np.int64), arr[:, 1], arr[:, 2]

    j01, dist1, dist2 = nn2(d0, d1)
    j10, _, _ = nn2(d1, d0)
    ok = (dist1 < ratio * dist2) & (j10[j01] == np.arange(len(d0)))
    return np.where(ok, j01, -1)


def section_matching(args: argparse.Namespace, sz: Sizes, device: torch.device) -> None:
    auto = resolve_precision("auto", device)
    print(
        f"## Matching (mutual nearest neighbours + ratio {DEFAULT_RATIO}, unit 128-D "
        f"descriptors: half of image 1's are noisy copies of image 0's; median of "
        f"{args.reps}; precision auto: {auto} here, fp32 below 2^18 entries; reduced "
        f"precision re-makes in fp32 the decisions its error bound leaves open)\n"
    )
    rows = []
    for n in sz.match_n:
        d0, d1 = unit_descriptors(n, seed=n)
        t0, t1 = torch.from_numpy(d0).to(device), torch.from_numpy(d1).to(device)
        tc = med(
            bench(
                lambda d0=d0, d1=d1: opencv_match(d0, d1, DEFAULT_RATIO),
                torch.device("cpu"),
                args.reps,
            )
        )
        ref = opencv_match(d0, d1, DEFAULT_RATIO)
        for prec in ("auto", "fp32"):

            def run(t0: torch.Tensor = t0, t1: torch.Tensor = t1, prec: str = prec) -> torch.Tensor:
                return match_descriptors(t0, t1, DEFAULT_RATIO, True, precision=prec)[0]

            t = med(bench(run, device, args.reps))
            ours = run().cpu().numpy()
            rows.append(
                [
                    f"{n} x {n}",
                    f"match_descriptors {prec} ({device.type})",
                    fmt(1 / t, 2),
                    fmt(1e3 * t, 1),
                    str(int((ours >= 0).sum())),
                    f"{float((ours == ref).mean()):.4f}",
                    f"{tc / t:.1f}x",
                ]
            )
        rows.append(
            [
                f"{n} x {n}",
                "cv2.BFMatcher knnMatch x2 + numpy (CPU)",
                fmt(1 / tc, 2),
                fmt(1e3 * tc, 1),
                str(int((ref >= 0).sum())),
                "",
                "1.0x",
            ]
        )
    table(
        [
            "descriptors",
            "matcher",
            "pairs/s",
            "ms / pair",
            "matches",
            "same result as OpenCV",
            "speed-up vs OpenCV",
        ],
        rows,
    )


def section_extract(args: argparse.Namespace, sz: Sizes, device: torch.device) -> None:
    nets, mr, _, trained = load_nets(args.weights)
    net_name = args.extract_net or trained or "hardnet"
    net = nets[net_name]
    tmp = Path(tempfile.mkdtemp(prefix="descmatch-speed-"))
    try:
        img_dir = tmp / "images"
        img_dir.mkdir()
        for i in range(sz.extract_images):
            cv2.imwrite(
                str(img_dir / f"scene{i:02d}.jpg"),
                render_scene(*sz.image, seed=i),
                [cv2.IMWRITE_JPEG_QUALITY, 92],
            )
        images = list_images(img_dir)
        first = ImageList(images.root, images.names[:1])
        n = len(images.names)
        w, h = sz.image
        print(
            f"## End-to-end extract ({n} rendered {w}x{h} JPEGs: read, detect, describe, "
            f"write HDF5; {args.reps} run(s) after a 1-image warm-up, median)\n"
        )
        describers: list[tuple[str, Any]] = [("rootsift", None)]
        precs = ["fp32"]
        auto = resolve_precision("auto", device)
        if auto != "fp32":
            precs.append(auto)
        bs = default_batch_size(device)
        for p in precs:
            describers.append(
                (
                    f"{net_name} ({p}, batch {bs})",
                    NetDescriber(net, device, bs, mr[net_name], {}, p),
                )
            )
        rows = []
        stage_rows = []
        for k in sz.extract_keypoints:
            det = SiftDetector(max_keypoints=k)
            for label, d in describers:
                d = d if d is not None else SiftDescriber(root=True)
                out = tmp / "features.h5"
                extract(first, out, d, det, overwrite=True)
                times = {}
                for prefetch in (2, 0):  # pipelined (the default), then one stage after another
                    results = []

                    def run(
                        d: Any = d,
                        out: Path = out,
                        det: SiftDetector = det,
                        results: list[Any] = results,
                        prefetch: int = prefetch,
                    ) -> None:
                        results.append(
                            extract(images, out, d, det, overwrite=True, prefetch=prefetch)
                        )

                    times[prefetch] = med(bench(run, device, args.reps, warmup=0))
                    if prefetch:
                        res = results[-1]
                rows.append(
                    [
                        str(k),
                        f"descmatch extract, {label}",
                        fmt(n / times[2], 2),
                        fmt(times[2] / n, 3),
                        fmt(res.keypoints_per_image),
                        fmt(res.patches_per_second),
                    ]
                )
                stages = (res.load_seconds, res.describe_seconds, res.write_seconds)
                stage_rows.append(
                    [
                        str(k),
                        label,
                        *(fmt(x / n, 3) for x in stages),
                        fmt(sum(stages) / n, 3),
                        fmt(times[0] / n, 3),
                        fmt(times[2] / n, 3),
                        fmt(max(stages) / n, 3),
                    ]
                )

            sift = cv2.SIFT_create(
                nfeatures=k,
                nOctaveLayers=det.n_octave_layers,
                contrastThreshold=det.contrast_threshold,
                edgeThreshold=det.edge_threshold,
                sigma=det.sigma,
                enable_precise_upscale=True,
            )
            counts = []

            def run_cv(sift: Any = sift, counts: list[int] = counts) -> None:
                counts.clear()
                for name in images.names:
                    im = cv2.imread(str(images.path(name)), cv2.IMREAD_GRAYSCALE)
                    kp, _ = sift.detectAndCompute(im, None)
                    counts.append(len(kp))

            cv2.imread(str(images.path(images.names[0])), cv2.IMREAD_GRAYSCALE)
            t = bench(run_cv, torch.device("cpu"), args.reps, warmup=0)
            rows.append(
                [
                    str(k),
                    "OpenCV SIFT detectAndCompute (read + detect + describe)",
                    fmt(n / med(t), 2),
                    fmt(med(t) / n, 3),
                    fmt(sum(counts) / len(counts)),
                    "",
                ]
            )
        table(
            [
                "max keypoints",
                "pipeline",
                "images/s",
                "s / image",
                "keypoints / image",
                "description patches/s",
            ],
            rows,
        )
        print(
            "OpenCV's nfeatures keeps the strongest responses, as --max-keypoints does; "
            "OpenCV may return a few more (several orientations of the last extremum).\n"
        )
        print(
            "### Pipelining: stage times (s / image) of the pipelined run, and wall time "
            "with and without the prefetch thread\n"
        )
        table(
            [
                "max keypoints",
                "describer",
                "read+detect",
                "describe",
                "write",
                "sum of stages",
                "wall, sequential (prefetch 0)",
                "wall, pipelined (default)",
                "slowest stage",
            ],
            stage_rows,
        )
        print(
            "Read+detect runs in a worker thread ahead of description (extract(prefetch=2)); "
            "on a CPU both stages share the same cores, so the overlap is bounded by them.\n"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def section_detect(args: argparse.Namespace, sz: Sizes, device: torch.device) -> None:
    from descmatch.dog import DoGDetector

    img = scene(sz)
    h, w = img.shape
    k = sz.keypoints
    reps = max(1, args.reps)
    print(f"## Detection ({w}x{h} rendered scene, {k} keypoints kept, median of {reps})\n")
    rows = []
    cv = SiftDetector(max_keypoints=k)
    t = med(bench(lambda: cv(img), torch.device("cpu"), reps))
    n_cv = len(cv(img))
    rows.append(["SiftDetector (OpenCV, CPU)", fmt(1000 * t, 1), fmt(n_cv)])
    dog = DoGDetector(max_keypoints=k, device=str(device))
    timg = torch.from_numpy(img).to(device)
    t = med(bench(lambda: dog(timg), device, reps))
    kd = dog(timg)
    rows.append([f"DoGDetector (torch, {device.type})", fmt(1000 * t, 1), fmt(len(kd))])
    table(["detector", "ms / image", "keypoints"], rows)
    ref = cv(img)
    d = np.linalg.norm(ref.xy[:, None] - kd.xy[None], axis=2).min(1) if len(kd) else np.inf
    print(
        f"OpenCV keypoints with a torch DoG keypoint within 0.5 px: "
        f"{100 * float(np.mean(d < 0.5)):.1f}%\n"
    )


SECTION_FNS = {
    "descriptors": section_descriptors,
    "patches": section_patches,
    "detect": section_detect,
    "matching": section_matching,
    "extract": section_extract,
}


# -- orchestration -----------------------------------------------------------------------------
def header(args: argparse.Namespace, device: torch.device) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import kornia

    print("# descmatch speed benchmark\n")
    if args.quick:
        print(
            "**--quick: tiny sizes, one repetition, a smoke test; the numbers are not "
            "measurements.**\n"
        )
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(
        f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch threads {torch.get_num_threads()}"
        f", OpenCV threads {cv2.getNumThreads()}"
    )
    if device.type == "cuda":
        print(f"- device: {torch.cuda.get_device_name(device)}")
    else:
        print("- device: CPU")
    print(
        f"- torch {torch.__version__}, kornia {kornia.__version__}, OpenCV {cv2.__version__}, "
        f"Python {platform.python_version()}"
    )
    note = load_nets(args.weights)[2]
    print(f"- weights: {note}")
    print(f"- auto precision here: {resolve_precision('auto', device)}\n")


def peak_line(device: torch.device) -> str:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cuda = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1
    return f"{PEAK_TAG} rss_kb={rss_kb} cuda_bytes={cuda}"


def run_child(args: argparse.Namespace, section: str) -> tuple[int, int, int]:
    """Run one section in a subprocess, echo its output; (exit code, peak RSS KB, CUDA B)."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--only",
        section,
        "--child",
        "--device",
        args.device,
        "--reps",
        str(args.reps),
        "--threads",
        str(args.threads),
        *(["--extract-net", args.extract_net] if args.extract_net else []),
    ]
    if args.quick:
        cmd.append("--quick")
    if args.weights:
        cmd += ["--weights", args.weights]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    cuda = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PEAK_TAG):
            cuda = int(line.split("cuda_bytes=")[1])
        else:
            print(line, end="", flush=True)
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, int(usage.ru_maxrss), cuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--weights", help="a checkpoint (its own net uses it; others random)")
    ap.add_argument(
        "--only",
        choices=[*SECTIONS, "imports"],
        help="run one section in this process ('imports': nothing, for the baseline memory)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition, 1 thread")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3)")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch and OpenCV threads (default: torch's default; 1 with --quick)",
    )
    ap.add_argument(
        "--extract-net",
        default=None,
        choices=list(NETS),
        help="learned net of the extract section (default: the --weights net, else hardnet)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    if args.threads is None:
        args.threads = 1 if args.quick else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available on this machine")
    sz = QUICK if args.quick else FULL

    if args.only:
        if not args.child:
            header(args, device)
        if args.only != "imports":
            SECTION_FNS[args.only](args, sz, device)
        sys.stdout.flush()
        line = peak_line(device)
        if args.child:
            print(line, flush=True)
        else:
            rss = int(line.split("rss_kb=")[1].split()[0])
            print(f"peak RSS of this process: {rss / 1024:,.0f} MB")
        return

    header(args, device)
    sys.stdout.flush()
    mem = []
    failed = []
    for section in ("imports", *SECTIONS):
        rc, rss_kb, cuda = run_child(args, section)
        if rc != 0:
            failed.append(section)
        mem.append((section, rss_kb, cuda))
    base = mem[0][1]
    print("## Peak memory per section (each in its own process; ru_maxrss of the child)\n")
    rows = []
    for section, rss_kb, cuda in mem:
        label = "imports only (baseline)" if section == "imports" else section
        row = [label, fmt(rss_kb / 1024), fmt((rss_kb - base) / 1024)]
        if device.type == "cuda":
            row.append(fmt(cuda / 2**20) if cuda >= 0 else "")
        rows.append(row)
    head = ["section", "peak RSS (MB)", "above baseline (MB)"]
    if device.type == "cuda":
        head.append("torch.cuda.max_memory_allocated (MB)")
    table(head, rows)
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
