"""Data-parallel training: ``torchrun --nproc_per_node 2 -m descmatch train`` on the CPU (gloo)
runs, keeps the ranks' weights equal (checked at every checkpoint), writes once from rank 0,
and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from descmatch.weights import load_net


def write_pool(path: Path, n: int = 384, groups: int = 6, p: int = 32) -> Path:
    """A tiny pool folder of random pairs (a patch and a noisy copy)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (n, 1, p, p), dtype=np.uint8)
    noisy = np.clip(base + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "pairs.npy", np.concatenate([base, noisy], 1))
    (path / "meta.json").write_text(
        json.dumps(
            {
                "format": "descmatch-pairpool",
                "version": 1,
                "kind": "photos",
                "num_pairs": n,
                "offsets": np.linspace(0, n, groups + 1).astype(int).tolist(),
                "patch_size": p,
                "mr_size": 6.0,
                "window_factor": 1.0,
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pool(tmp_path_factory.mktemp("ddp") / "pool")


def torchrun(pool: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node 2 -m descmatch train ...`` (torchrun is
    ``python -m torch.distributed.run``: the same interpreter as the tests)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "descmatch",
        "train",
        "--method",
        "hardnet",
        "--data",
        f"pool:{pool}",
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "32",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--val",
        "none",
        "--checkpoint-every",
        "1",
        *extra,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_two_processes_train_write_once_and_resume_exactly(pool: Path, tmp_path: Path) -> None:
    a = tmp_path / "a"
    res = torchrun(pool, a)
    assert (res.stdout + res.stderr).count("wrote ") == 1  # rank 0 alone reports and writes
    meta = load_net("hardnet", a / "hardnet.pt").meta
    assert meta["steps"] == 4 and meta["world_size"] == 2 and "x 2 processes" in meta["hardware"]
    ck = torch.load(a / "checkpoint.pt", weights_only=True)
    # Every checkpoint (here every step) gathered both ranks' RNG states after checking that
    # their weights agree (a mismatch fails the run).
    assert ck["step"] == 4 and len(ck["rng"]["ranks"]) == 2
    assert ck["config"]["world_size"] == 2 and ck["config"]["rank"] == 0
    assert [r["step"] for r in json.loads((a / "train_log.json").read_text())["rows"]] == [4]

    # Stopped after one step (the time limit, agreed by both ranks), then resumed.
    b = tmp_path / "b"
    torchrun(pool, b, "--time-limit", "0")
    assert torch.load(b / "checkpoint.pt", weights_only=True)["step"] == 1
    torchrun(pool, b, "--resume")
    sa = torch.load(a / "hardnet.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "hardnet.pt", weights_only=True)["state_dict"]
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def test_two_processes_mine_hard_negatives(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "hn"
    torchrun(
        pool,
        out,
        "--sampler",
        "hard-negative",
        "--mine-every",
        "2",
        "--mine-points",
        "96",
        "--mine-group",
        "8",
    )
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["objective_state"]["round"] == 1
    assert ck["objective_state"]["pools"][0]["descriptors"].shape == (96, 128)
    assert load_net("hardnet", out / "hardnet.pt").meta["sampler"] == "hard-negative"
