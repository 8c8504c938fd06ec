"""The training loop: a tiny run learns and writes loadable weights, resume is exact, every
method and loss runs, data sources mix, augmentation keeps pairs corresponding."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from fixtures_brown import make_brown_fixture

from descmatch.errors import ConfigError, OutputError, WeightsError
from descmatch.examples import render_scene
from descmatch.nets import NETS
from descmatch.train.descriptors import DataSpec, TrainConfig, augment_pairs, read_log, train
from descmatch.train.losses import LOSSES
from descmatch.train.poolbuild import build_pool
from descmatch.weights import load_net

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny work: one thread is as fast


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i in range(3):
        cv2.imwrite(str(d / f"scene{i}.png"), render_scene(320, 240, seed=20 + i))
    return d


@pytest.fixture(scope="module")
def pool32(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_pool([photos], tmp_path_factory.mktemp("p32") / "pool", 128, 32, 6.0, 0)


@pytest.fixture(scope="module")
def pool64(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 64 px covering twice the window: L2-Net-CS uses it whole, the 32-px nets its centre.
    return build_pool(
        [photos], tmp_path_factory.mktemp("p64") / "pool", 32, 64, 6.0, 0, window_factor=2.0
    )


def _losses(cb_log: list[str]) -> list[float]:
    return [float(t.split()[1]) for t in cb_log]


def test_tiny_run_learns_and_writes_weights(pool32: Path, tmp_path: Path) -> None:
    texts: list[str] = []
    out = tmp_path / "run"
    cfg = TrainConfig(
        method="hardnet",
        data=[f"pool:{pool32}"],
        out_dir=out,
        steps=30,
        batch_size=32,
        images_per_batch=2,
        log_every=10,
        eval_every=15,
        val_pairs=200,
        command="descmatch train --method hardnet",
    )
    path = train(cfg, progress=lambda i, n, t: texts.append(t))
    losses = _losses(texts)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.03
    assert path == out / "hardnet.pt"
    loaded = load_net("hardnet", path)
    meta = loaded.meta
    assert meta["steps"] == 30 and meta["mr_size"] == 6.0 and meta["loss"] == "hardnet"
    assert meta["command"] == "descmatch train --method hardnet"
    assert 0.0 <= meta["val_fpr95"] <= 1.0 and meta["hardware"] and meta["wall_time_s"] > 0
    assert "pool:" in meta["data"]
    x = torch.rand(4, 1, 32, 32)
    assert loaded.net(x).shape == (4, 128)
    rows = read_log(out)
    assert [r["step"] for r in rows] == [10, 15, 20, 30]
    assert rows[1]["fpr95"] is not None and rows[0]["fpr95"] is None
    with open(out / "train_log.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["step", "loss", "lr", "fpr95", "pairs_per_s", "seconds", "batch_acc"]
    assert len(table) == 4 and float(table[-1]["lr"]) == 0.0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 30 and {"optimizer", "scheduler", "rng", "config"} <= set(ck)
    # The folder holds a run: training again without resume is refused.
    with pytest.raises(OutputError):
        train(cfg)


def test_time_limit_stops_and_resume_finishes(pool32: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        method="l2net",
        data=[str(pool32)],
        out_dir=tmp_path,
        steps=4,
        batch_size=8,
        val="none",
        time_limit_s=0.0,
    )
    assert load_net("l2net", train(cfg)).meta["steps"] == 1
    cfg.resume, cfg.time_limit_s = True, None
    assert load_net("l2net", train(cfg)).meta["steps"] == 4


class _Stop(Exception):
    pass


def test_resume_is_exact(pool32: Path, tmp_path: Path) -> None:
    def cfg(out: Path) -> TrainConfig:
        # HardNet has dropout (global RNG), the loss and augmentation their own streams.
        return TrainConfig(
            method="hardnet",
            data=[str(pool32)],
            out_dir=out,
            steps=20,
            batch_size=16,
            images_per_batch=2,
            checkpoint_every=10,
            log_every=5,
            eval_every=10,
            val_pairs=100,
        )

    straight: list[str] = []
    a = train(cfg(tmp_path / "a"), lambda i, n, t: straight.append(t))

    first: list[str] = []

    def crash(i: int, n: int, t: str) -> None:
        first.append(t)
        if i == 10:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg(tmp_path / "b"), crash)
    assert not (tmp_path / "b" / "hardnet.pt").exists()
    resumed: list[str] = []
    c = cfg(tmp_path / "b")
    c.resume = True
    b = train(c, lambda i, n, t: resumed.append(t))
    assert len(resumed) == 10
    assert _losses(first + resumed) == _losses(straight)
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k
    ra, rb = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [(r["step"], r["loss"], r["fpr95"]) for r in ra] == [
        (r["step"], r["loss"], r["fpr95"]) for r in rb
    ]
    # Resuming a finished run does no step and keeps the weights.
    again = torch.load(train(c), weights_only=True)
    assert again["meta"]["steps"] == 20
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in sb["state_dict"].items())


@pytest.mark.parametrize("method", list(NETS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_method_and_loss_runs(pool64: Path, tmp_path: Path, method: str, loss: str) -> None:
    cfg = TrainConfig(
        method=method,
        loss=loss,
        data=[str(pool64)],
        out_dir=tmp_path,
        steps=2,
        batch_size=8,
        images_per_batch=2,
        val="none",
    )
    path = train(cfg)
    loaded = load_net(method, path)
    assert loaded.meta["steps"] == 2 and loaded.meta["loss"] == loss
    assert loaded.meta["patch_size"] == NETS[method].patch_size


def test_brown_and_photos_mix(pool32: Path, tmp_path: Path) -> None:
    brown = make_brown_fixture(tmp_path / "brown", n_points=40, per_point=3)
    cfg = TrainConfig(
        method="sosnet",
        data=[f"pool:{pool32}@1", f"brown:{brown}@2"],
        out_dir=tmp_path / "run",
        steps=6,
        batch_size=16,
        val=f"brown:{brown}",
        val_pairs=100,
    )
    path = train(cfg)
    meta = load_net("sosnet", path).meta
    assert meta["val_set"].startswith("brown:") and 0.0 <= meta["val_fpr95"] <= 1.0
    assert "brown:" in meta["data"] and "pool:" in meta["data"]


def test_init_starts_from_trained_weights(pool32: Path, tmp_path: Path) -> None:
    # Another seed than the runs below: their random starts differ from these weights.
    base = train(
        TrainConfig(
            method="sosnet",
            data=[str(pool32)],
            out_dir=tmp_path / "a",
            steps=4,
            batch_size=16,
            val="none",
            seed=1,
        )
    )
    start = load_net("sosnet", base)

    def cfg(out: str, **kw: object) -> TrainConfig:
        return TrainConfig(
            method="sosnet",
            data=[str(pool32)],
            out_dir=tmp_path / out,
            steps=3,
            batch_size=16,
            val="none",
            lr=1e-3,
            **kw,
        )

    # The first step starts from the given weights: fine-tuning moves them only a little,
    # a fresh run starts far away.
    tuned = load_net("sosnet", train(cfg("b", init=str(base), checkpoint_every=1)))
    fresh = load_net("sosnet", train(cfg("c")))

    def dist(a: torch.nn.Module) -> float:
        return max(
            (p - q).abs().max().item()
            for p, q in zip(a.parameters(), start.net.parameters(), strict=True)
        )

    assert dist(tuned.net) < 0.01 < dist(fresh.net)
    info = tuned.meta["init"]
    assert info["sha256"] == start.sha256 and info["steps"] == 4 and info["path"] == str(base)
    assert "init" not in fresh.meta
    # Resuming a fine-tuning run continues from its checkpoint, not from --init again.
    again = cfg("b", init=str(base), resume=True)
    again.steps = 5
    resumed = load_net("sosnet", train(again))
    assert resumed.meta["steps"] == 5 and resumed.meta["init"]["sha256"] == start.sha256
    # Weights of another method or another patch window are refused.
    with pytest.raises(WeightsError, match="sosnet, not hardnet"):
        train(
            TrainConfig(
                method="hardnet",
                data=[str(pool32)],
                out_dir=tmp_path / "d",
                steps=1,
                batch_size=8,
                val="none",
                init=str(base),
            )
        )
    other = tmp_path / "other.pt"
    ck = torch.load(base, weights_only=True)
    ck["meta"]["mr_size"] = 10.0
    torch.save(ck, other)
    with pytest.raises(ConfigError, match="mr_size 10"):
        train(cfg("e", init=str(other)))


def test_central_surround_starts_from_plain_weights(pool64: Path, tmp_path: Path) -> None:
    base = train(
        TrainConfig(
            method="sosnet",
            data=[str(pool64)],
            out_dir=tmp_path / "a",
            steps=2,
            batch_size=16,
            val="none",
            seed=1,
        )
    )
    start = load_net("sosnet", base)
    path = train(
        TrainConfig(
            method="sosnet-cs",
            data=[str(pool64)],
            out_dir=tmp_path / "b",
            steps=1,
            batch_size=16,
            val="none",
            lr=1e-7,
            init=str(base),
        )
    )
    cs = load_net("sosnet-cs", path)
    assert cs.meta["init"]["sha256"] == start.sha256
    for tower in (cs.net.center, cs.net.surround):
        for p, q in zip(tower.parameters(), start.net.tower.parameters(), strict=True):
            assert (p - q).abs().max().item() < 1e-4
    # A plain net of another family does not start it.
    other = train(
        TrainConfig(
            method="l2net",
            data=[str(pool64)],
            out_dir=tmp_path / "c",
            steps=1,
            batch_size=16,
            val="none",
        )
    )
    with pytest.raises(WeightsError, match="l2net, not sosnet-cs"):
        train(
            TrainConfig(
                method="sosnet-cs",
                data=[str(pool64)],
                out_dir=tmp_path / "d",
                steps=1,
                batch_size=16,
                val="none",
                init=str(other),
            )
        )


def test_pool_that_does_not_fit_the_net(pool32: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        method="l2net-cs", data=[str(pool32)], out_dir=tmp_path, steps=1, batch_size=8
    )
    with pytest.raises(ConfigError):
        train(cfg)


def test_data_spec_parse(pool32: Path, tmp_path: Path) -> None:
    assert DataSpec.parse(f"{pool32}@0.5") == DataSpec("pool", pool32, 0.5)
    assert DataSpec.parse("brown:/x/liberty").kind == "brown"
    assert DataSpec.parse(f"photos:{tmp_path}@2").weight == 2.0
    assert DataSpec.parse(str(tmp_path)).kind == "photos"
    with pytest.raises(ConfigError):
        DataSpec.parse("pool:/x@-1")
    with pytest.raises(ConfigError):
        TrainConfig(method="nope").resolved()
    r = TrainConfig(method="hardnet").resolved()
    assert (r["optimizer"], r["lr"], r["weight_decay"], r["loss"]) == ("sgd", 10.0, 1e-4, "hardnet")
    assert TrainConfig(method="hardnet", optimizer="adam").resolved()["lr"] == 1e-3


def test_augment_keeps_pairs_corresponding() -> None:
    x = torch.rand(64, 1, 16, 16).repeat(1, 2, 1, 1)  # identical anchor and positive
    g = torch.Generator().manual_seed(0)
    y = augment_pairs(x, g, flip_rot90=True, rotation_jitter=0.0, scale_jitter=0.0)
    assert torch.equal(y[:, 0], y[:, 1]) and not torch.equal(y, x)
    z = augment_pairs(x, torch.Generator().manual_seed(0), True, 10.0, 0.1)
    assert z.shape == x.shape and not torch.equal(z[:, 0], z[:, 1])
    z2 = augment_pairs(x, torch.Generator().manual_seed(0), True, 10.0, 0.1)
    assert torch.equal(z, z2)
