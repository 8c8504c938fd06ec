"""What `descmatch extract` costs per image, next to RootSIFT and OpenCV SIFT, in one run.

On the same images, resized to --size (default 1024x768) into a temporary folder:

  * seconds per image of `descmatch extract` (a subprocess each, --threads threads): the
    default (no options), the default in int8, the full sosnet-cs pipeline with explicit
    options, sosnet without size pooling, the compact student (`-m student`, its own
    precision and fp32), RootSIFT, and OpenCV SIFT's detectAndCompute
    (a subprocess too, its nfeatures = the keypoint budget), at each --keypoints; the time is
    extract's own (after start-up), the process wall time next to it, and each subprocess's
    peak RSS (ru_maxrss, from os.wait4);
  * the frame refiner's seconds per image (fp32, bf16, int8) on the detector's keypoints;
  * each shipped net's patches/s per precision (fp32, bf16, int8) and batch size, through
    NetDescriber.describe_patches on patches cut from the first image (int8: the shipped
    int8 model, else one calibrated here on those patches, which is fine for timing).

Prints markdown tables; the per-image ones give ratios against RootSIFT measured in this run.

    python benchmarks/extract_cost.py IMAGE... [--keypoints 4000 8000] [--threads 2]
        [--size 1024x768] [--batch-sizes 64 256 1024] [--skip-nets] [--out table.md]
        [--also LABEL=OPTIONS ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from descmatch.describe import NetDescriber, build_describer, resolve_method
from descmatch.detect import SiftDetector
from descmatch.images import read_image
from descmatch.int8 import Int8Net, cpu_has_int8_dot, int8_path, onnxruntime_available, quantize_net
from descmatch.nets import NETS, DescriptorNet
from descmatch.nets.cost import count_macs
from descmatch.nets.fold import fold_batchnorm
from descmatch.patches import extract_patches
from descmatch.weights import load_net, weights_dir

PRECISIONS = ("fp32", "bf16", "int8")

#: (label, extract options): the pipelines timed per image. A pipeline that resolves to the
#: same describer as one before it (e.g. the default) is timed once.
PIPELINES: list[tuple[str, list[str]]] = [
    ("default", []),
    (
        "sosnet-cs full, int8",
        ["-m", "sosnet-cs", *["--frames", "auto", "--size-pool", "0.7,1.4"]]
        + ["--precision", "int8"],
    ),
    (
        "sosnet-cs full, bf16",
        ["-m", "sosnet-cs", *["--frames", "auto", "--size-pool", "0.7,1.4"]]
        + ["--precision", "bf16"],
    ),
    ("sosnet, no size pooling", ["-m", "sosnet", "--size-pool", "none"]),
    (
        "sosnet, no size pooling, bf16",
        ["-m", "sosnet", "--size-pool", "none", "--precision", "bf16"],
    ),
    (
        "sosnet, no size pooling, no refiner",
        ["-m", "sosnet", "--size-pool", "none"] + ["--frames", "none"],
    ),
    ("student", ["-m", "student"]),
    ("student, fp32", ["-m", "student", "--precision", "fp32"]),
    ("rootsift", ["-m", "rootsift"]),
]


def parse_also(spec: str) -> tuple[str, list[str]]:
    """``LABEL=OPTIONS`` (``--also``) -> (label, extract options)."""
    label, sep, opts = spec.partition("=")
    if not sep or not label.strip():
        raise SystemExit(f"--also {spec!r}: give LABEL=OPTIONS")
    return label.strip(), opts.split()


def describer_key(opts: list[str]) -> tuple:
    """What a pipeline's options resolve to: method, precision, weights, refiner, pooling."""
    flags = {"-m": "auto", "--precision": "auto", "--frames": "auto", "--size-pool": "auto"}
    flags.update(dict(zip(opts[::2], opts[1::2], strict=True)))
    d = build_describer(
        flags["-m"],
        weights=flags.get("--weights"),
        precision=flags["--precision"],
        frames=flags["--frames"],
        size_pool=flags["--size-pool"],
    )
    meta = tuple(sorted((k, str(v)) for k, v in d.meta.items()))
    return (d.name, getattr(d, "precision", ""), meta)


SIFT_CHILD = """
import json, sys, time, cv2
cv2.setNumThreads(int(sys.argv[1]))
k = int(sys.argv[2])
imgs = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in sys.argv[3:]]
sift = cv2.SIFT_create(nfeatures=k)
n, t0 = 0, time.perf_counter()
for im in imgs:
    kps, desc = sift.detectAndCompute(im, None)
    n += len(kps)
print("RESULT", json.dumps({"seconds": time.perf_counter() - t0, "keypoints": n}))
"""


def prepare(images: list[Path], size: tuple[int, int], folder: Path) -> list[Path]:
    """The images resized to ``size`` (width, height; height, width for portrait images),
    gray, as PNG files in ``folder``."""
    out = []
    for i, p in enumerate(images):
        img = read_image(p)
        wh = size if img.shape[1] >= img.shape[0] else (size[1], size[0])
        small = cv2.resize(
            (np.clip(img, 0, 1) * 255).astype(np.uint8), wh, interpolation=cv2.INTER_AREA
        )
        q = folder / f"{i:03d}_{p.stem}.png"
        cv2.imwrite(str(q), small)
        out.append(q)
    return out


def run_child(cmd: list[str], threads: int) -> tuple[float, int, str, float]:
    """Wall seconds, peak RSS (KB), stdout and CPU seconds (user + system) of a
    subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    assert proc.stdout is not None
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
    return wall, int(usage.ru_maxrss), text, usage.ru_utime + usage.ru_stime


def time_extract(folder: Path, n: int, opts: list[str], k: int, threads: int, tmp: Path) -> dict:
    out = tmp / f"f{time.monotonic_ns()}.h5"
    cmd = [sys.executable, "-m", "descmatch", "extract", str(folder), str(out)]
    cmd += ["--max-keypoints", str(k), "--device", "cpu", *opts]
    wall, rss, text, cpu = run_child(cmd, threads)
    m = re.search(r"(\d+) image\(s\) in ([\d.]+) s", text)
    seconds = float(m.group(2)) if m else wall
    out.unlink(missing_ok=True)
    return {"per_image": seconds / n, "wall": wall, "rss_mb": rss / 1024, "cpu": cpu / n}


def time_sift(paths: list[Path], k: int, threads: int) -> dict:
    cmd = [sys.executable, "-c", SIFT_CHILD, str(threads), str(k), *map(str, paths)]
    wall, rss, text, cpu = run_child(cmd, threads)
    res = json.loads(text.split("RESULT", 1)[1])
    n = len(paths)
    return {"per_image": res["seconds"] / n, "wall": wall, "rss_mb": rss / 1024, "cpu": cpu / n}


def rate(fn, patches: torch.Tensor, min_seconds: float = 1.0) -> float:
    """Patches per second of ``fn(patches)`` after one warm-up call."""
    fn(patches)
    done, t0 = 0, time.perf_counter()
    while True:
        fn(patches)
        done += len(patches)
        if time.perf_counter() - t0 >= min_seconds:
            return done / (time.perf_counter() - t0)


def int8_model(name: str, net: torch.nn.Module, path: Path, calib: torch.Tensor, tmp: Path):
    """The shipped int8 model of a weights file, else one calibrated on ``calib``."""
    shipped = int8_path(path)
    if shipped.is_file():
        return Int8Net(shipped, net.patch_size), "shipped"
    out = tmp / f"{name}.int8.onnx"
    quantize_net(net, calib, out, "benchmark")
    return Int8Net(out, net.patch_size), "calibrated here"


def net_rates(first: Path, batch_sizes: list[int], tmp: Path) -> list[str]:
    """Markdown rows: patches/s per net, precision and batch size, each net called as
    extract calls it (descriptor nets through NetDescriber.describe_patches, the refiner
    folded as NetDescriber.refine runs it)."""
    image = read_image(first)
    kps = SiftDetector(max_keypoints=2048)(image)
    img = torch.from_numpy(image)
    rows = []
    cpu = torch.device("cpu")
    for name in [n for n in (*NETS, "frames") if (weights_dir() / f"{n}.pt").is_file()]:
        loaded = load_net(name)
        net, p = loaded.net, loaded.net.patch_size
        window = getattr(net, "window_factor", 1.0)
        patches = extract_patches(
            img, kps.xy, kps.size, kps.angle, patch_size=p, window_factor=window
        )
        patches = patches.repeat(-(-max(batch_sizes) // len(patches)), 1, 1, 1)
        shape = net.input_shape() if isinstance(net, DescriptorNet) else (1, p, p)
        macs = count_macs(net, shape) / 1e6
        for prec in PRECISIONS:
            if prec == "int8" and not onnxruntime_available():
                continue
            int8, note = None, ""
            if prec == "int8":
                int8, note = int8_model(name, net, loaded.path, patches[:1024], tmp)
            cells = []
            for bs in batch_sizes:
                x = patches[:bs]
                if name == "frames":
                    run = frames_runner(net, prec, int8)
                else:
                    d = NetDescriber(net, cpu, bs, precision=prec, int8_net=int8)
                    run = d.describe_patches
                cells.append(f"{rate(run, x):,.0f}")
            label = f"{prec} ({note})" if note else prec
            rows.append(f"| {name} | {macs:.1f} | {label} | " + " | ".join(cells) + " |")
    return rows


def frames_runner(net: torch.nn.Module, prec: str, int8: Int8Net | None):
    """The refiner's call as NetDescriber.refine makes it, in ``prec``."""
    if int8 is not None:
        return int8
    folded = fold_batchnorm(net.eval())
    dtype = torch.bfloat16 if prec == "bf16" else None

    @torch.inference_mode()
    def run(x: torch.Tensor):
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return folded(x)

    return run


#: Candidate compact students (name, input side, (channels, stride) per 3x3 conv): L2-Net-like
#: towers, each conv + ReLU, then a conv over the remaining map to 128-D, L2-normalised.
STUDENTS: list[tuple[str, int, list[tuple[int, int]]]] = [
    ("L2 tower w32 d7, 32px", 32, [(32, 1), (32, 1), (64, 2), (64, 1), (128, 2), (128, 1)]),
    ("w16 d7, 32px", 32, [(16, 1), (16, 1), (32, 2), (32, 1), (64, 2), (64, 1)]),
    ("w8 d7, 32px", 32, [(8, 1), (8, 1), (16, 2), (16, 1), (32, 2), (32, 1)]),
    ("w32 d5, 32px, stride-2 first", 32, [(32, 2), (64, 1), (64, 2), (128, 1)]),
    ("w16 d5, 32px, stride-2 first", 32, [(16, 2), (32, 1), (32, 2), (64, 1)]),
    ("w16 d6, 24px", 24, [(16, 1), (32, 2), (32, 1), (64, 2), (64, 1)]),
    ("w32 d5, 16px", 16, [(32, 1), (64, 2), (64, 1), (128, 2)]),
    ("w16 d5, 16px", 16, [(16, 1), (32, 2), (32, 1), (64, 2)]),
    ("w16 d4, 16px", 16, [(16, 1), (32, 2), (64, 2)]),
]


class Student(DescriptorNet):
    """A candidate student (untrained: for timing only). Shape: (N,1,P,P) -> (N,128)."""

    name = "student"
    default_conf = {"dim": 128}

    def __init__(self, side: int, layers: list[tuple[int, int]]) -> None:
        super().__init__()
        self.patch_size = side  # type: ignore[misc]
        mods: list[torch.nn.Module] = [torch.nn.InstanceNorm2d(1)]
        cin, s = 1, side
        for cout, stride in layers:
            mods += [torch.nn.Conv2d(cin, cout, 3, stride, 1), torch.nn.ReLU(inplace=True)]
            cin, s = cout, s // stride
        mods += [torch.nn.Conv2d(cin, 128, s), torch.nn.Flatten()]
        self.body = torch.nn.Sequential(*mods)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return torch.nn.functional.normalize(self.body(x), dim=1), []


def student_rows(first: Path, batch_size: int, tmp: Path) -> list[str]:
    """Markdown rows: M MACs/patch and patches/s (fp32, bf16, int8) of each candidate."""
    image = read_image(first)
    kps = SiftDetector(max_keypoints=1024)(image)
    img = torch.from_numpy(image)
    rows = []
    for label, side, layers in STUDENTS:
        torch.manual_seed(0)
        net = Student(side, layers).eval()
        patches = extract_patches(img, kps.xy, kps.size, kps.angle, patch_size=side)
        x = patches.repeat(-(-batch_size // len(patches)), 1, 1, 1)[:batch_size]
        cells = []
        for prec in PRECISIONS:
            int8 = None
            if prec == "int8":
                if not onnxruntime_available():
                    cells.append("-")
                    continue
                out = tmp / "student.int8.onnx"
                int8 = Int8Net(quantize_net(net, patches, out, "benchmark"), side)
            d = NetDescriber(net, torch.device("cpu"), batch_size, precision=prec, int8_net=int8)
            cells.append(f"{rate(d.describe_patches, x):,.0f}")
        macs = count_macs(net, (1, side, side)) / 1e6
        rows.append(f"| {label} | {side} | {macs:.2f} | " + " | ".join(cells) + " |")
    return rows


def refiner_rows(paths: list[Path], k: int) -> list[str]:
    """Seconds per image of the frame refiner (patch cutting included): fp32 (as the fp32
    and bf16 pipelines run it), bf16 autocast (for comparison) and int8."""
    rows = []
    det = SiftDetector(max_keypoints=k)
    items = [(img, det(img)) for img in (read_image(p) for p in paths[:3])]
    for prec in PRECISIONS:
        if prec == "int8" and not onnxruntime_available():
            continue
        d = build_describer("sosnet", precision="int8" if prec == "int8" else "fp32")
        assert isinstance(d, NetDescriber)
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16")
        with autocast:
            d.refine(*items[0])
            t0 = time.perf_counter()
            for img, kps in items:
                d.refine(img, kps)
        label = {"fp32": "fp32 (fp32 and bf16 pipelines)", "bf16": "bf16 autocast (unused)"}
        rows.append(f"| {label.get(prec, prec)} | {(time.perf_counter() - t0) / len(items):.3f} |")
    return rows


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="+", type=Path, help="image files")
    ap.add_argument("--keypoints", type=int, nargs="+", default=[4000, 8000])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT the images are resized to")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--skip-nets", action="store_true", help="no net and refiner tables")
    ap.add_argument("--skip-extract", action="store_true", help="no per-image extract tables")
    ap.add_argument("--students", action="store_true", help="also time candidate compact students")
    ap.add_argument("--pipelines", nargs="+", default=None, help="labels of PIPELINES to run")
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="LABEL=OPTIONS",
        help="also time extract with these options (e.g. a student: "
        "'student=-m student --weights W --frames none --size-pool none'), repeatable",
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    lines = [
        f"# descmatch extract cost ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"- command: `python benchmarks/extract_cost.py {' '.join(sys.argv[1:])}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs (int8 dot product: "
        f"{'yes' if cpu_has_int8_dot() else 'no'}), "
        f"{args.threads} threads; load average at start {os.getloadavg()[0]:.1f}",
        f"- torch {torch.__version__}, OpenCV {cv2.__version__}; default method: "
        f"{resolve_method('auto')}; {len(args.images)} images at {w}x{h}",
        "",
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="descmatch-cost-") as tmp_s:
        tmp = Path(tmp_s)
        folder = tmp / "images"
        folder.mkdir()
        paths = prepare(args.images, (w, h), folder)
        pipes = [p for p in PIPELINES if args.pipelines is None or p[0] in args.pipelines]
        pipes += [parse_also(spec) for spec in args.also]
        for k in [] if args.skip_extract else args.keypoints:
            results: dict[str, dict] = {}
            seen: dict[tuple, str] = {}
            for label, o in pipes:
                key = describer_key(o)
                if key in seen:
                    results[f"{label} (= {seen[key]})"] = results[seen[key]]
                    continue
                seen[key] = label
                results[label] = time_extract(folder, len(paths), o, k, args.threads, tmp)
                results[label]["precision"] = key[1]
            results["OpenCV SIFT detectAndCompute"] = time_sift(paths, k, args.threads)
            ref = results.get("rootsift", {}).get("per_image")
            table = [
                f"## {k} keypoints: seconds per image",
                "",
                "| pipeline | precision | s/image | x RootSIFT | CPU s/image | x RootSIFT "
                "| process wall s | peak RSS MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
            for label, r in results.items():
                ratio = f"{r['per_image'] / ref:.2f}" if ref else "-"
                cpu_ref = results.get("rootsift", {}).get("cpu")
                cpu_ratio = f"{r['cpu'] / cpu_ref:.2f}" if cpu_ref else "-"
                table.append(
                    f"| {label} | {r.get('precision') or '-'} | {r['per_image']:.3f} | {ratio} "
                    f"| {r['cpu']:.3f} | {cpu_ratio} "
                    f"| {r['wall']:.1f} "
                    f"| {r['rss_mb']:.0f} |"
                )
            print("\n".join([*table, ""]), flush=True)
            lines += [*table, ""]
        if not args.skip_nets:
            table = [
                f"## frame refiner, {args.keypoints[0]} keypoints: seconds per image",
                "",
                "| precision | s/image |",
                "|---|---:|",
                *refiner_rows(paths, args.keypoints[0]),
                "",
                f"## nets: patches/s, {args.threads} threads",
                "",
                "| net | M MACs/patch | precision | "
                + " | ".join(f"batch {b}" for b in args.batch_sizes)
                + " |",
                "|---|---:|---|" + "---:|" * len(args.batch_sizes),
                *net_rates(paths[0], args.batch_sizes, tmp),
                "",
            ]
            print("\n".join(table), flush=True)
            lines += table
        if args.students:
            table = [
                f"## candidate students (untrained): patches/s, batch 256, {args.threads} threads",
                "",
                "| student | input | M MACs/patch | fp32 | bf16 | int8 |",
                "|---|---:|---:|---:|---:|---:|",
                *student_rows(paths[0], 256, tmp),
                "",
            ]
            print("\n".join(table), flush=True)
            lines += table
    lines.append(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
