"""One set of resume rules for every method, and files from users never run code: a crafted
checkpoint or pool whose pickle would call ``os.system`` is refused with one line (the
marker file its command would create never appears), as are corrupt and foreign files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MainResult
from test_train_ddp import write_pool

from descmatch.errors import ConfigError, InputError
from descmatch.train.descriptors import TrainConfig, train
from descmatch.train.framepool import load_frame_pools
from descmatch.weights import load_net

pytestmark = pytest.mark.usefixtures("one_thread")


class _Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "descmatch", "method": "frames", "x": _Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pool(tmp_path_factory.mktemp("pool") / "pool", n=96, groups=4)


def _one_line_error(result: MainResult) -> str:
    code, _, err = result
    assert code != 0, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("method", ["frames", "hardnet"])
def test_a_crafted_checkpoint_is_refused_without_running_code(
    tmp_path: Path, pool: Path, method: str, call_main: Callable[..., MainResult]
) -> None:
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    _crafted_checkpoint(out / "checkpoint.pt", marker)
    photos = tmp_path / "photos"
    photos.mkdir()
    data = f"photos:{photos}" if method == "frames" else f"pool:{pool}"
    args = ["train", "--method", method, "--data", data, "--out", str(out), "--resume"]
    err = _one_line_error(call_main(*args))
    assert "checkpoint.pt" in err and "refused" in err
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all", None],
    ids=["corrupt", "foreign"],
)
def test_corrupt_and_foreign_checkpoints_are_one_line_errors(
    tmp_path: Path, pool: Path, content: bytes | None, call_main: Callable[..., MainResult]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    if content is None:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, out / "checkpoint.pt")
    else:
        (out / "checkpoint.pt").write_bytes(content)
    args = ["train", "--data", f"pool:{pool}", "--out", str(out), "--resume"]
    err = _one_line_error(call_main(*args))
    assert "checkpoint.pt" in err


def test_a_crafted_pool_is_refused_without_running_code(
    tmp_path: Path, pool: Path, call_main: Callable[..., MainResult]
) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    write_pool(bad, n=96, groups=4)
    np.save(bad / "pairs.npy", np.array([_Payload(marker)] * 96, dtype=object), allow_pickle=True)
    args = ["train", "--data", f"pool:{bad}", "--out", str(tmp_path / "run"), "--steps", "1"]
    err = _one_line_error(call_main(*args))
    assert "pairs.npy" in err and not marker.exists()
    # A frame pool (.npz) with an object array: the same.
    npz = tmp_path / "frames-train.npz"
    np.savez(npz, patches=np.array([_Payload(marker)], dtype=object), a1=np.zeros(1))
    with pytest.raises(InputError, match="not a frame pool"):
        load_frame_pools([npz])
    assert not marker.exists()


def test_resume_rules(tmp_path: Path, pool: Path) -> None:
    def cfg(**kw: object) -> TrainConfig:
        base: dict[str, object] = {
            "method": "hardnet",
            "data": [f"pool:{pool}"],
            "out_dir": tmp_path / "run",
            "steps": 2,
            "batch_size": 16,
            "val": "none",
            "precision": "fp32",
        }
        return TrainConfig(**{**base, **kw})  # type: ignore[arg-type]

    train(cfg())
    # Another setting that shapes the run is refused, naming it; nothing is trained.
    with pytest.raises(ConfigError, match="batch_size=16, now batch_size=8"):
        train(cfg(batch_size=8, steps=3, resume=True))
    with pytest.raises(ConfigError, match="seed"):
        train(cfg(seed=5, steps=3, resume=True))
    assert load_net("hardnet", tmp_path / "run" / "hardnet.pt").meta["steps"] == 2
    # More steps extend the run (the schedule is recomputed over the new total).
    path = train(cfg(steps=4, resume=True, checkpoint_every=1, log_every=1))
    assert load_net("hardnet", path).meta["steps"] == 4
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["optimizer"]["param_groups"][0]["lr"] == 0.0
    # A method's checkpoint does not resume another method.
    with pytest.raises(ConfigError, match="a hardnet run, not sosnet"):
        train(cfg(method="sosnet", resume=True))
