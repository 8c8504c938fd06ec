"""Training recipes (``--recipe default|paper``): each resolves to its documented settings,
explicit options override it, HardNet's paper recipe runs two forward passes over batches of
distinct points drawn over the whole pool, loss options reach the loss, and a tiny run of every
recipe trains and records its settings."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from descmatch.cli import app
from descmatch.distributed import Dist
from descmatch.errors import ConfigError
from descmatch.examples import render_scene
from descmatch.train.descriptors import DescriptorObjective, TrainConfig, train
from descmatch.train.objective import RunEnv, RunSettings, StepContext
from descmatch.train.poolbuild import build_pool
from descmatch.weights import load_net

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()

# The documented settings (README / the recipe notes), written out by hand.
HARDNET_PAPER = {
    "sampler": "random",
    "batch_size": 1024,
    "optimizer": "sgd",
    "lr": 10.0,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "dampening": 0.9,
    "lr_schedule": "linear",
    "augment": True,
    "flip_rot90": True,
    "rotation_jitter": 0.0,
    "scale_jitter": 0.0,
    "separate_passes": True,
    "loss": "hardnet",
    "loss_options": {},
    "dropout": 0.3,
}
L2NET_PAPER = {
    "sampler": "progressive",
    "batch_size": 1024,
    "p1_fraction": 0.5,
    "optimizer": "sgd",
    "lr": 0.01,
    "weight_decay": 1e-4,
    "momentum": 0.9,
    "dampening": 0.0,
    "lr_schedule": "linear",
    "augment": True,
    "flip_rot90": True,
    "rotation_jitter": 0.0,
    "scale_jitter": 0.0,
    "separate_passes": False,
    "loss": "l2net",
    "loss_options": {"e2": "paper", "e3": "inner", "reduction": "mean"},
    "dropout": 0.0,
}
SOSNET_PAPER = {**HARDNET_PAPER, "loss": "sosnet", "dropout": 0.1}
_DEFAULT = {
    "sampler": "same-image",
    "batch_size": 512,
    "images_per_batch": 4,
    "momentum": 0.9,
    "lr_schedule": "linear",
    "augment": True,
    "flip_rot90": True,
    "rotation_jitter": 5.0,
    "scale_jitter": 0.05,
    "separate_passes": False,
}
L2NET_DEFAULT = {
    **_DEFAULT,
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "dampening": 0.0,
    "loss": "l2net",
    "loss_options": {"e2": "paper", "e3": "inner"},
}
HARDNET_DEFAULT = {
    **_DEFAULT,
    "optimizer": "sgd",
    "lr": 10.0,
    "weight_decay": 1e-4,
    "dampening": 0.9,
    "loss": "hardnet",
    "loss_options": {},
}
SOSNET_DEFAULT = {
    **_DEFAULT,
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "dampening": 0.0,
    "loss": "sosnet",
    "loss_options": {},
}
EXPECTED = {
    ("l2net", "paper"): L2NET_PAPER,
    ("l2net-cs", "paper"): L2NET_PAPER,
    ("hardnet", "paper"): HARDNET_PAPER,
    ("sosnet", "paper"): SOSNET_PAPER,
    ("sosnet-cs", "paper"): SOSNET_PAPER,
    ("l2net", "default"): L2NET_DEFAULT,
    ("l2net-cs", "default"): L2NET_DEFAULT,
    ("hardnet", "default"): HARDNET_DEFAULT,
    ("sosnet", "default"): SOSNET_DEFAULT,
    ("sosnet-cs", "default"): SOSNET_DEFAULT,
}


def _settings(c: TrainConfig, keys: Any) -> dict[str, Any]:
    out = {k: getattr(c, k) for k in keys if k != "dropout"}
    if "dropout" in keys:
        out["dropout"] = c.net_conf.get("dropout")
    return out


@pytest.mark.parametrize(("method", "recipe"), sorted(EXPECTED))
def test_recipe_resolves_to_its_documented_settings(method: str, recipe: str) -> None:
    want = EXPECTED[(method, recipe)]
    got = TrainConfig(method=method, recipe=recipe).with_recipe()
    assert _settings(got, want) == want
    assert got.with_recipe() == got  # resolving is idempotent


def test_baseline_losses_take_their_papers_forms() -> None:
    c = TrainConfig(method="l2net", recipe="paper", loss="contrastive").with_recipe()
    assert c.loss_options == {"form": "squared"} and c.sampler == "random"
    c = TrainConfig(method="hardnet", recipe="paper", loss="triplet").with_recipe()
    assert c.loss_options == {"form": "squared", "mining": "random"}
    # The method's net recipe stays (optimiser, two passes); the l2net options do not leak.
    assert c.optimizer == "sgd" and c.separate_passes
    c = TrainConfig(method="l2net", loss="hardnet").with_recipe()
    assert c.loss_options == {}


def test_explicit_settings_override_the_recipe() -> None:
    c = TrainConfig(
        method="hardnet",
        recipe="paper",
        batch_size=64,
        sampler="same-image",
        separate_passes=False,
        net_conf={"dropout": 0.1},
        loss_options={"margin": 0.5},
    ).with_recipe()
    assert (c.batch_size, c.sampler, c.separate_passes) == (64, "same-image", False)
    assert c.net_conf["dropout"] == 0.1 and c.loss_options == {"margin": 0.5}
    assert (c.optimizer, c.lr, c.dampening) == ("sgd", 10.0, 0.9)  # the rest is the paper's
    # Another optimiser takes its own learning rate, no weight decay, no dampening.
    c = TrainConfig(method="hardnet", recipe="paper", optimizer="adam").with_recipe()
    assert (c.optimizer, c.lr, c.weight_decay, c.dampening) == ("adam", 1e-3, 0.0, 0.0)
    c = TrainConfig(method="l2net", loss_options={"e3": "inner", "e2": "none"}).with_recipe()
    assert c.loss_options == {"e2": "none", "e3": "inner"}


def test_bad_recipe_or_loss_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown recipe 'papers'"):
        TrainConfig(method="l2net", recipe="papers").with_recipe()
    with pytest.raises(ConfigError, match="has no option 'e4'; valid: e2, e3, reduction"):
        TrainConfig(method="l2net", loss_options={"e4": "x"}).with_recipe()
    with pytest.raises(ConfigError, match="unknown l2net e3 'dot'"):
        TrainConfig(method="l2net", loss_options={"e3": "dot"}).with_recipe()


# Runs on a small pool of rendered photos.


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("photos")
    for i in range(6):
        cv2.imwrite(str(d / f"scene{i}.png"), render_scene(320, 240, seed=40 + i))
    return build_pool([d], tmp_path_factory.mktemp("pool") / "pool", 64, 32, 6.0, 0)


def _objective(pool: Path, tmp_path: Path, **kw: Any) -> DescriptorObjective:
    cfg = TrainConfig(data=[f"pool:{pool}"], out_dir=tmp_path, val="none", **kw)
    obj = DescriptorObjective(cfg)
    env = RunEnv(RunSettings(tmp_path, 1), torch.device("cpu"), Dist(), contextlib.nullcontext)
    obj.check(env)
    obj.open(env)
    return obj


def test_hardnet_paper_recipe_runs_two_forward_passes(pool: Path, tmp_path: Path) -> None:
    paper = _objective(pool, tmp_path / "p", method="hardnet", recipe="paper", batch_size=16)
    default = _objective(pool, tmp_path / "d", method="hardnet", batch_size=16)
    batch = paper.batch(0)
    assert batch.shape == (16, 2, 32, 32)
    # forward_features is what the training module calls: count the tower's inputs instead.
    for obj, want in ((paper, [16, 16]), (default, [32])):
        torch.manual_seed(0)
        net = obj.build_net(None)
        calls: list[int] = []
        net.tower.register_forward_pre_hook(lambda m, a, c=calls: c.append(int(a[0].shape[0])))
        model = obj.train_module(net)
        ctx = StepContext(
            0, torch.Generator().manual_seed(0), torch.device("cpu"), contextlib.nullcontext
        )
        loss, _ = obj.loss(model, batch, ctx)
        assert torch.isfinite(loss)
        assert calls == want


def test_hardnet_paper_batches_are_distinct_points_over_the_pool(
    pool: Path, tmp_path: Path
) -> None:
    paper = _objective(pool, tmp_path / "p", method="hardnet", recipe="paper", batch_size=48)
    default = _objective(pool, tmp_path / "d", method="hardnet", batch_size=48)
    offsets = paper.batches.pools[0].group_offsets
    assert offsets is not None and len(offsets) - 1 >= 6

    def groups(obj: DescriptorObjective, step: int) -> tuple[int, int]:
        rng = np.random.default_rng([0, step, 17])
        pts = obj.batches.samplers[0].batch_points(rng, step)
        return len(np.unique(pts)), len(np.unique(np.searchsorted(offsets, pts, side="right")))

    for step in range(5):
        n, g = groups(paper, step)
        assert n == 48 and g > 4  # distinct points, drawn over the whole pool
        n, g = groups(default, step)
        assert n == 48 and g <= 4  # the project's default: 4 photos a batch


def test_loss_options_reach_the_loss(pool: Path, tmp_path: Path) -> None:
    obj = _objective(
        pool, tmp_path, method="l2net", batch_size=8, loss_options={"e3": "none", "e2": "none"}
    )
    seen: list[dict[str, Any]] = []
    fn = obj.loss_fn

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        seen.append(kw)
        return fn(*args, **kw)

    obj.loss_fn = spy
    torch.manual_seed(0)
    model = obj.train_module(obj.build_net(None))
    ctx = StepContext(
        0, torch.Generator().manual_seed(0), torch.device("cpu"), contextlib.nullcontext
    )
    obj.loss(model, obj.batch(0), ctx)
    assert seen == [{"e2": "none", "e3": "none"}]


@pytest.mark.parametrize("method", ["l2net", "hardnet", "sosnet"])
@pytest.mark.parametrize("recipe", ["default", "paper"])
def test_tiny_run_of_each_recipe_trains(
    pool: Path, tmp_path: Path, method: str, recipe: str
) -> None:
    cfg = TrainConfig(
        method=method,
        recipe=recipe,
        data=[f"pool:{pool}"],
        out_dir=tmp_path,
        steps=3,
        batch_size=16,
        val="none",
    )
    path = train(cfg)
    meta = load_net(method, path).meta
    want = EXPECTED[(method, recipe)]
    assert meta["steps"] == 3 and meta["recipe"] == recipe
    assert meta["config"]["recipe"] == recipe and meta["config"]["batch_size"] == 16
    for key in ("sampler", "separate_passes", "optimizer", "lr", "loss_options"):
        assert meta["config"][key] == want[key]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["config"]["sampler"] == want["sampler"]


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
def test_tiny_run_of_a_baseline_loss_paper_recipe(pool: Path, tmp_path: Path, loss: str) -> None:
    cfg = TrainConfig(
        method="l2net",
        recipe="paper",
        loss=loss,
        data=[f"pool:{pool}"],
        out_dir=tmp_path,
        steps=2,
        batch_size=16,
        val="none",
    )
    meta = load_net("l2net", train(cfg)).meta
    assert meta["loss"] == loss and meta["config"]["sampler"] == "random"
    assert meta["config"]["loss_options"]["form"] == "squared"


def test_cli_recipe_and_loss_options(pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "-m", "hardnet", "--recipe", "paper", "--data", f"pool:{pool}"]
    args += ["--out", str(out), "--steps", "2", "--batch-size", "16", "--val", "none"]
    res = runner.invoke(app, [*args, "--loss-option", "margin=0.5"])
    assert res.exit_code == 0, res.output
    cfg = load_net("hardnet", out / "hardnet.pt").meta["config"]
    assert cfg["batch_size"] == 16 and cfg["sampler"] == "random"  # explicit, then the paper's
    assert cfg["loss_options"] == {"margin": 0.5} and cfg["separate_passes"] is True
    base = ["train", "-m", "l2net", "--data", f"pool:{pool}", "--out", str(tmp_path / "b")]
    for extra, message in (
        (["--loss-option", "e4"], "expected KEY=VALUE"),
        (["--loss-option", "e3=dot"], "unknown l2net e3 'dot'"),
        (["--recipe", "papers"], "unknown recipe 'papers'"),
    ):
        bad = runner.invoke(app, [*base, *extra])
        assert bad.exit_code != 0 and message in bad.output + str(bad.exception)
    assert not (tmp_path / "b").exists()  # nothing written
