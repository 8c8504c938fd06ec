"""The settings of a descriptor training run (:class:`TrainConfig`) and each method's
defaults; :mod:`.descriptors` trains from them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..nets import NETS
from ..patches import DEFAULT_MR_SIZE
from .data import DataSpec
from .losses import check_loss_options, get_loss
from .objective import RunSettings
from .photos import PhotoPairConfig
from .recipe import (
    OPTIMIZERS,
    PRECISIONS,
    RECIPE_KEYS,
    SCHEDULES,
    recipe_settings,
)
from .samplers import SAMPLERS

#: Default loss, optimiser, learning rate and weight decay of each method.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "l2net": {"loss": "l2net", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "l2net-cs": {"loss": "l2net", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "hardnet": {"loss": "hardnet", "optimizer": "sgd", "lr": 10.0, "weight_decay": 1e-4},
    "sosnet": {"loss": "sosnet", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "sosnet-cs": {"loss": "sosnet", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "student": {"loss": "hardnet", "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
}
#: Learning rate of an optimiser chosen against the method's default.
OPTIMIZER_LR = {"sgd": 10.0, "adam": 1e-3, "adamw": 1e-3}
assert set(OPTIMIZER_LR) == set(OPTIMIZERS)


#: Recipe settings :meth:`TrainConfig.resolved` works out on their own (the optimiser's
#: settings depend on which optimiser wins; the loss, its options and dropout are merged);
#: every other recipe key is taken from the config where set, else from the recipe.
_RESOLVED_APART = frozenset(
    {"optimizer", "lr", "weight_decay", "dampening", "loss", "loss_options", "dropout"}
)


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoints and logs).

    Settings left None (loss, loss options, optimiser and schedule, batch size, sampler,
    augmentation, ``separate_passes``) take the values of ``recipe`` (``default`` or
    ``paper``, see :meth:`with_recipe`). ``eval_every`` None: once per epoch over the
    training points.
    ``val``: None holds out ``val_fraction`` of the first source's photos; ``"none"`` skips
    validation. ``time_limit_s`` stops early (checkpoint and weights written) after that much
    training time in this call. ``command`` is recorded in the weights' meta. ``sampler``
    (one of :data:`~descmatch.train.samplers.SAMPLERS`) with ``p1_fraction`` (progressive) and
    ``mine_every``, ``mine_points``, ``mine_group`` (hard-negative; None: one group per batch)
    composes the batches. ``init`` (a weights file or shipped name of the same method) starts
    the net from trained weights instead of random ones (fine-tuning). ``max_tilt`` > 1 adds
    random camera tilts up to that factor to the homographies of photo sources;
    ``pair_max_angle`` (degrees) and ``pair_max_scale`` (size ratio) bound how far the frames
    of a detected photo or HPatches pair may disagree
    (:class:`~descmatch.train.photos.PhotoPairConfig`). ``rank``/``world_size`` are set from the
    environment under torchrun.
    """

    method: str = "hardnet"
    data: list[str | DataSpec] = field(default_factory=list)
    out_dir: Path = Path("runs/train")
    recipe: str = "default"
    loss: str | None = None
    loss_options: dict[str, Any] | None = None
    steps: int = 10000
    batch_size: int | None = None
    images_per_batch: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    dampening: float | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    warmup_steps: int | None = None
    augment: bool | None = None
    flip_rot90: bool | None = None
    rotation_jitter: float | None = None
    scale_jitter: float | None = None
    separate_passes: bool | None = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 500
    eval_every: int | None = None
    log_every: int = 20
    val: str | None = None
    val_fraction: float = 0.05
    val_pairs: int = 5000
    eval_batch_size: int = 1024
    resume: bool = False
    time_limit_s: float | None = None
    mr_size: float = DEFAULT_MR_SIZE
    pairs_per_image: int = 512
    pool_workers: int = 1
    max_images: int | None = None
    sampler: str | None = None
    p1_fraction: float | None = None
    mine_every: int = 1000
    mine_points: int = 32768
    mine_group: int | None = 64
    net_conf: dict[str, Any] = field(default_factory=dict)
    init: str | None = None
    frames: str | None = None
    max_tilt: float = 1.0
    pair_max_angle: float = 30.0
    pair_max_scale: float = 1.2
    command: str = ""
    rank: int = 0
    world_size: int = 1

    def with_recipe(self) -> TrainConfig:
        """This config with every setting left None taken from its recipe (``recipe``, one of
        :data:`~.recipe.RECIPE_NAMES`, see :func:`~.recipe.recipe_settings`): a setting given
        explicitly wins over the recipe's. An optimiser other than the recipe's, given without
        a learning rate or weight decay, takes :data:`OPTIMIZER_LR`, no weight decay and no
        dampening. ``loss_options`` are the recipe's (for its loss) updated with the given
        ones, validated by :func:`~.losses.check_loss_options`; the recipe's dropout goes into
        ``net_conf`` unless that sets one. Every setting of the result is concrete; calling it
        again returns the same."""
        if self.method not in NETS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(NETS)}")
        r = recipe_settings(self.method, self.recipe, self.loss)
        d = METHOD_DEFAULTS.get(self.method, {})
        loss = self.loss or r.get("loss") or d["loss"]
        get_loss(loss)
        r_opt = str(r.get("optimizer") or d["optimizer"])
        opt = (self.optimizer or r_opt).lower()
        if opt not in OPTIMIZER_LR:
            raise ConfigError(f"unknown optimizer {opt!r}; valid: {', '.join(OPTIMIZER_LR)}")
        same = opt == r_opt

        def pick(name: str, fallback: Any) -> Any:
            v = getattr(self, name)
            return v if v is not None else (r.get(name, fallback) if same else None)

        lr = pick("lr", d.get("lr"))
        wd = pick("weight_decay", d.get("weight_decay", 0.0))
        damp = pick("dampening", 0.0)
        concrete = {
            k: getattr(self, k) if getattr(self, k) is not None else r[k]
            for k in RECIPE_KEYS
            if k not in _RESOLVED_APART
        }
        options = check_loss_options(loss, {**r["loss_options"], **(self.loss_options or {})})
        net_conf = dict(self.net_conf)
        if "dropout" in r and "dropout" not in net_conf:
            net_conf["dropout"] = float(r["dropout"])
        out = replace(
            self,
            loss=loss,
            loss_options=options,
            optimizer=opt,
            lr=float(lr if lr is not None else OPTIMIZER_LR[opt]),
            weight_decay=float(wd if wd is not None else 0.0),
            dampening=float(damp if damp is not None else 0.0),
            net_conf=net_conf,
            **concrete,
        )
        if out.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown lr schedule {out.lr_schedule!r}; valid: {', '.join(SCHEDULES)}"
            )
        if out.precision not in PRECISIONS:
            raise ConfigError(
                f"unknown precision {out.precision!r}; valid: {', '.join(PRECISIONS)}"
            )
        if out.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {out.sampler!r}; valid: {', '.join(SAMPLERS)}")
        return out

    def resolved(self) -> dict[str, Any]:
        """The effective loss and optimiser settings (recipe and method defaults filled in)."""
        c = self.with_recipe()
        return {
            "loss": c.loss,
            "optimizer": c.optimizer,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
        }

    def photo_conf(self) -> PhotoPairConfig:
        """How photo (and HPatches) pairs are made."""
        return PhotoPairConfig.of_pairs(self.max_tilt, self.pair_max_angle, self.pair_max_scale)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "data":
                v = [str(DataSpec.parse(s)) for s in v]
            elif isinstance(v, Path):
                v = str(v)
            out[f.name] = v
        return json.loads(json.dumps(out, default=str))

    def run_settings(self) -> RunSettings:
        """How the Trainer drives this run."""
        return RunSettings.of(self)
