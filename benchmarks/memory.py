"""Does memory stay bounded as the work grows?

  (a) extraction streams: peak RSS of ``descmatch extract`` (the CLI, in a subprocess) on 1
      image and on 200 images (rendered 640x480 scenes in a temporary folder; RootSIFT by
      default to keep it fast). Streaming means the two peaks are about the same.
  (b) matching: match_descriptors on 50k x 50k random unit 128-D descriptors (in a
      subprocess): peak RSS during matching minus RSS before it (the peak is reset through
      /proc/self/clear_refs where Linux allows it, else ru_maxrss), next to the 10 GB a
      full float32 distance matrix would take; on CUDA also torch.cuda.max_memory_allocated.
Peak RSS of a child is its ru_maxrss, read with os.wait4 (what ``/usr/bin/time -f %M``
reports). ``--quick`` (a smoke test): 1 vs 20 images, 5k x 5k, one thread.

    python benchmarks/memory.py [--images 1 200] [--method rootsift] [--match-n 50000]
                                [--device cpu|cuda] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TAG = "@@match"


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """Run a command; (exit code, wall seconds, peak RSS in KB of the child, its stdout)."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        assert proc.stdout is not None
        out = proc.stdout.read()  # not communicate(): it would reap the child before wait4
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            sys.stderr.write(err.read())
    return proc.returncode, wall, int(usage.ru_maxrss), out


def child_env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def write_images(folder: Path, n: int) -> None:
    import cv2

    from descmatch.examples import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(
            str(folder / f"img{i:04d}.jpg"),
            render_scene(640, 480, seed=i),
            [cv2.IMWRITE_JPEG_QUALITY, 90],
        )


def extraction(args: argparse.Namespace) -> bool:
    counts = args.images
    tmp = Path(tempfile.mkdtemp(prefix="descmatch-memory-"))
    ok = True
    try:
        pool = tmp / "all"
        write_images(pool, max(counts))
        names = sorted(p.name for p in pool.iterdir())
        print(
            f"## (a) descmatch extract, {args.method}, 640x480 rendered images, "
            f"--max-keypoints {args.max_keypoints}\n"
        )
        print("| images | wall s | images/s | peak RSS (MB) | output (MB) |")
        print("|---|---|---|---|---|")
        peaks = []
        for c in counts:
            folder = tmp / f"n{c}"
            folder.mkdir()
            for name in names[:c]:
                try:
                    os.link(pool / name, folder / name)
                except OSError:
                    shutil.copyfile(pool / name, folder / name)
            out = tmp / f"n{c}.h5"
            cmd = [
                sys.executable,
                "-m",
                "descmatch",
                "--quiet",
                "extract",
                str(folder),
                str(out),
                "--method",
                args.method,
                "--device",
                args.device,
                "--max-keypoints",
                str(args.max_keypoints),
            ]
            rc, wall, rss_kb, _ = run_measured(cmd, child_env(args.threads))
            if rc != 0:
                print(f"| {c} | failed (exit {rc}) | | | |")
                ok = False
                continue
            peaks.append(rss_kb)
            print(
                f"| {c} | {wall:.1f} | {c / wall:.2f} | {rss_kb / 1024:,.0f} | "
                f"{out.stat().st_size / 2**20:,.1f} |"
            )
        if len(peaks) == len(counts) and len(counts) > 1:
            print(
                f"\npeak RSS, {counts[-1]} images minus {counts[0]}: "
                f"{(peaks[-1] - peaks[0]) / 1024:+,.0f} MB "
                "(wall time includes Python and torch start-up)\n"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ok


def matching(args: argparse.Namespace) -> bool:
    n = args.match_n
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--match-child",
        str(n),
        "--device",
        args.device,
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    rc, _, rss_kb, out = run_measured(cmd, child_env(args.threads))
    print(
        f"## (b) match_descriptors, {n:,} x {n:,} random unit 128-D descriptors, mutual + "
        f"ratio, {args.device}\n"
    )
    if rc != 0:
        print(f"failed (exit {rc})\n")
        return False
    r = json.loads(next(line for line in out.splitlines() if line.startswith(TAG))[len(TAG) :])
    mb = 2**20
    rows = [
        ("matching time", f"{r['seconds']:.2f} s"),
        ("matches", f"{r['matches']:,}"),
        ("RSS before matching (descriptors made)", f"{r['rss_before'] / mb:,.0f} MB"),
        ("peak RSS during matching", f"{r['peak'] / mb:,.0f} MB ({r['peak_source']})"),
        ("**peak RSS delta**", f"**{(r['peak'] - r['rss_before']) / mb:,.0f} MB**"),
        ("child's ru_maxrss (whole process)", f"{rss_kb / 1024:,.0f} MB"),
        ("one distance-matrix chunk (MAX_ELEMENTS float32)", f"{r['chunk_bytes'] / mb:,.0f} MB"),
        ("a full float32 distance matrix would be", f"{4 * n * n / mb:,.0f} MB"),
    ]
    if r.get("cuda_delta") is not None:
        rows.append(("torch.cuda.max_memory_allocated delta", f"{r['cuda_delta'] / mb:,.0f} MB"))
    print("| quantity | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print()
    return True


def _status(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) * 1024 if m else -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status("VmHWM") >= 0


def match_child(n: int, device_name: str, threads: int | None) -> None:
    import torch

    from descmatch.match import DEFAULT_RATIO, MAX_ELEMENTS, match_descriptors

    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    d0 = torch.randn(n, 128, generator=g)
    d0 /= d0.norm(dim=1, keepdim=True)
    d1 = torch.randn(n, 128, generator=g)
    d1 /= d1.norm(dim=1, keepdim=True)
    d0, d1 = d0.to(device), d1.to(device)
    cuda0 = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)
    gc.collect()
    rss_before = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    m, _ = match_descriptors(d0, d1, DEFAULT_RATIO, True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if reset:
        peak, source = _status("VmHWM"), "VmHWM after reset"
    else:
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    res = {
        "seconds": seconds,
        "matches": int((m >= 0).sum()),
        "rss_before": rss_before,
        "peak": peak,
        "peak_source": source,
        "chunk_bytes": 4 * min(n, max(1, MAX_ELEMENTS // n)) * n,
        "cuda_delta": (
            torch.cuda.max_memory_allocated(device) - cuda0 if cuda0 is not None else None
        ),
    }
    print(TAG + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 vs 20 images, 5k x 5k, one thread")
    ap.add_argument(
        "--images",
        type=int,
        nargs="+",
        default=None,
        help="image counts to extract (default 1 200)",
    )
    ap.add_argument("--method", default="rootsift", help="extract --method (default rootsift)")
    ap.add_argument("--max-keypoints", type=int, default=4000)
    ap.add_argument("--match-n", type=int, default=None, help="descriptors per side (50000)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/torch threads of the children (default: theirs; 1 with --quick)",
    )
    ap.add_argument("--only", choices=["extract", "match"], help="run one part")
    ap.add_argument("--match-child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.match_child is not None:
        match_child(args.match_child, args.device, args.threads)
        return
    if args.images is None:
        args.images = [1, 20] if args.quick else [1, 200]
    if args.match_n is None:
        args.match_n = 5000 if args.quick else 50000
    if args.threads is None and args.quick:
        args.threads = 1
    print("# descmatch memory benchmark\n")
    if args.quick:
        print("**--quick: a smoke test at reduced sizes.**\n")
    print(
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} logical cores, "
        f"threads: {args.threads or 'default'}\n"
    )
    ok = True
    if args.only in (None, "extract"):
        ok &= extraction(args)
    if args.only in (None, "match"):
        ok &= matching(args)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
