"""Shared fixtures of the core-pipeline tests: the shipped example views, small rendered
scenes, a RootSIFT features file of the examples, and tiny helpers (PNG writer, runners).

Session-scoped fixtures are read-only for the tests that use them: a test that changes a
file copies it first.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from descmatch import cli
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.examples import copy_examples, render_scene
from descmatch.extract import extract
from descmatch.images import list_images

EXAMPLE_KEYPOINTS = 1000
SMALL_KEYPOINTS = 200


@pytest.fixture(autouse=True)
def no_weights(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Independence from the weights that ship, for every test: DESCMATCH_WEIGHTS points to
    an empty folder, so ``auto`` is RootSIFT and every learned net is "without weights"
    (subprocesses inherit it). tests/test_shipped_weights.py lifts it. Returns that folder."""
    empty = tmp_path_factory.getbasetemp() / "no-weights"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("DESCMATCH_WEIGHTS", str(empty))
    return empty


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three shipped views and their homographies (read-only)."""
    d = tmp_path_factory.mktemp("examples")
    copy_examples(d)
    return d


@pytest.fixture
def example_copy(example_dir: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the example folder."""
    d = tmp_path / "ex"
    shutil.copytree(example_dir, d)
    return d


@pytest.fixture(scope="session")
def example_features(example_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RootSIFT features of the example views, 1000 keypoints each (read-only)."""
    out = tmp_path_factory.mktemp("example-features") / "features.h5"
    res = extract(
        list_images(example_dir),
        out,
        build_describer("rootsift"),
        SiftDetector(max_keypoints=EXAMPLE_KEYPOINTS),
    )
    assert res.images == 3 and not res.failed
    return out


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints of untrained nets (read-only), built once: building a net is the slow
    part. my-hardnet.pt (meta data/steps), sos.pt (meta mr_size 7.5), cs.pt (l2net-cs)."""
    import torch

    from descmatch.nets import build_net
    from descmatch.weights import save_checkpoint

    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    save_checkpoint(d / "my-hardnet.pt", build_net("hardnet"), meta={"data": "test", "steps": 0})
    save_checkpoint(d / "sos.pt", build_net("sosnet"), meta={"mr_size": 7.5})
    save_checkpoint(d / "cs.pt", build_net("l2net-cs"), meta={})
    return d


@pytest.fixture
def hardnet_ckpt(ckpt_dir: Path) -> Path:
    return ckpt_dir / "my-hardnet.pt"


@pytest.fixture(scope="session")
def scene() -> np.ndarray:
    """A 320x240 textured gray scene, uint8 (H,W)."""
    return render_scene(320, 240, seed=1)


def write_scenes(
    folder: Path,
    n: int,
    width: int = 200,
    height: int = 150,
    ext: str = ".png",
    first_seed: int = 10,
) -> list[Path]:
    """Write ``n`` different small scenes as ``img{i}{ext}`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}{ext}"
        assert cv2.imwrite(str(p), render_scene(width, height, seed=first_seed + i))
        paths.append(p)
    return paths


@pytest.fixture
def scene_dir(tmp_path: Path) -> Path:
    """A fresh folder of three small scenes (img0.png .. img2.png)."""
    d = tmp_path / "imgs"
    write_scenes(d, 3)
    return d


def png_bytes(arr: np.ndarray, color_type: int, bit_depth: int = 8) -> bytes:
    """Encode a PNG by hand (for layouts OpenCV cannot write, e.g. gray + alpha).

    color_type: 0 gray, 2 RGB, 4 gray+alpha, 6 RGBA. Shape: (H,W) or (H,W,C).
    """
    h, w = arr.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\0" + np.ascontiguousarray(arr[y]).astype(dtype).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``python -m descmatch ARGS`` in a subprocess (the real entry point and exit codes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "descmatch", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _restore_global_state() -> Iterator[None]:
    """The CLI configures logging, the quiet flag and a SIGTERM handler: undo after each."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sigterm = signal.getsignal(signal.SIGTERM)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    signal.signal(signal.SIGTERM, sigterm)
    cli._state["quiet"] = False
    cli._state["sigterm"] = False


MainResult = tuple[int, str, str]


@pytest.fixture
def call_main(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., MainResult]:
    """Run ``descmatch.cli.main()`` (the console entry point, with its error -> exit code
    mapping) in-process: returns (exit code, stdout, stderr)."""

    def call(*args: str) -> MainResult:
        monkeypatch.setattr(sys, "argv", ["descmatch", *args])
        capsys.readouterr()
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module (request it with an autouse wrapper or usefixtures)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
