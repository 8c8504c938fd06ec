"""How a net is optimised: the optimiser, its learning rate and the schedule (a
:class:`Recipe`), the precision the forward passes run in, and the descriptor nets' training
recipes (:data:`TRAINING_RECIPES`: ``default`` and ``paper`` per method, resolved by
:func:`recipe_settings`).

A recipe is part of an objective (:class:`~descmatch.train.trainer.Objective`): each method
brings its own (HardNet's SGD with lr 10, the Adam of L2-Net and SOSNet, the frame net's
Adam), and :class:`~descmatch.train.trainer.Trainer` builds the optimiser and the schedule
from it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Recipe:
    """Optimiser and learning-rate schedule of a run.

    ``schedule``: ``linear`` decays to 0 at the last step, ``cosine`` follows half a cosine
    to 0, ``constant`` keeps ``lr``; ``warmup_steps`` ramps linearly up to it first.
    ``dampening`` applies to SGD's momentum (HardNet's official optimiser uses 0.9).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    dampening: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"unknown lr schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}"
            )
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("needs lr > 0, weight decay >= 0 and warmup steps >= 0")

    def make_optimizer(self, net: nn.Module) -> torch.optim.Optimizer:
        """The optimiser over the net's trainable parameters."""
        params = [p for p in net.parameters() if p.requires_grad]
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                dampening=self.dampening,
                weight_decay=self.weight_decay,
            )
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def factor(self, step: int, total: int) -> float:
        """The learning rate at ``step`` of ``total`` steps, as a factor of ``lr``."""
        return lr_factor(step, total, self.schedule, self.warmup_steps)


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Learning-rate factor at ``step`` of ``total`` (see :class:`Recipe`)."""
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    total = max(total, 1)
    if schedule == "linear":
        f = max(0.0, 1.0 - step / total)
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    else:
        f = 1.0
    return w * f


def autocast_dtype(device: torch.device, precision: str) -> tuple[str | None, torch.dtype | None]:
    """(device type, dtype) of autocast for this device and precision; (None, None): fp32.

    ``auto`` is bf16 on CPUs with bf16 support (about twice the fp32 speed measured on
    AVX512-BF16) and on CUDA devices that have it, else fp16 on CUDA, else fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None, None
    if device.type == "cuda":
        if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
            return "cuda", torch.bfloat16
        return "cuda", torch.float16
    if precision == "fp16":
        raise ConfigError("fp16 training needs a CUDA device; use bf16 or fp32 on the CPU")
    if precision == "bf16":
        return "cpu", torch.bfloat16
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        ok = False
    return ("cpu", torch.bfloat16) if ok else (None, None)


def autocast_factory(
    device_type: str | None, dtype: torch.dtype | None
) -> Callable[[], AbstractContextManager[object]]:
    """A function that opens the run's autocast context (a null context for fp32)."""
    if dtype is None or device_type is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


# Training recipes of the descriptor nets (``--recipe``).

#: Recipe names: ``default`` (the project's, chosen by measurement) and ``paper`` (each paper's
#: training recipe as far as the data allows).
RECIPE_NAMES = ("default", "paper")

#: Settings a recipe may set (fields of :class:`~descmatch.train.descriptors.TrainConfig`).
RECIPE_KEYS = (
    "sampler",
    "batch_size",
    "images_per_batch",
    "p1_fraction",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "dampening",
    "lr_schedule",
    "warmup_steps",
    "augment",
    "flip_rot90",
    "rotation_jitter",
    "scale_jitter",
    "separate_passes",
    "loss",
    "loss_options",
    "dropout",
)

#: What every recipe starts from (the project's training defaults).
BASE_RECIPE: dict[str, Any] = {
    "sampler": "same-image",
    "batch_size": 512,
    "images_per_batch": 4,
    "p1_fraction": 0.5,
    "momentum": 0.9,
    "dampening": 0.0,
    "lr_schedule": "linear",
    "warmup_steps": 0,
    "augment": True,
    "flip_rot90": True,
    "rotation_jitter": 5.0,
    "scale_jitter": 0.05,
    "separate_passes": False,
    "loss_options": {},
}

# HardNet's published code (Mishchuk et al. 2017, ``code/HardNet.py``): batches of 1024
# distinct 3D points drawn uniformly, SGD lr 10 (momentum 0.9, dampening 0.9, weight decay
# 1e-4) decayed linearly to 0, dropout 0.3, random flips and transposes applied alike to both
# patches of a pair, anchors and positives through the net in two forward passes.
_HARDNET_PAPER: dict[str, Any] = {
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
    "dropout": 0.3,
}

# L2-Net (Tian et al. 2017): progressive sampling (each batch one pair from each of its
# distinct points, half of it walking a shuffled sequence of the data), E1 + E2 + E3 with the
# paper's terms, flips and quarter turns (the "+" models), no dropout; SGD with momentum in
# MatConvNet (the learning rate and its schedule are not given in what we could consult: lr
# 0.01, weight decay 1e-4, linear decay are our reading), one siamese forward pass.
_L2NET_PAPER: dict[str, Any] = {
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

# SOSNet (Tian et al. 2019) trains as HardNet's code does (distinct-point batches of 1024, two
# forward passes, flips and quarter turns) with FOS + SOSR (k = 8) and dropout 0.1; its
# optimiser settings are not given in what we could consult, so HardNet's code values are used.
_SOSNET_PAPER: dict[str, Any] = {**_HARDNET_PAPER, "loss": "sosnet", "dropout": 0.1}

# The project's recipes, chosen by measurement on CPU runs of a few thousand steps: batches of
# 512 pairs from 4 photos (hard same-image negatives), Adam lr 1e-3 (SGD lr 10 for HardNet),
# linear decay, flips, quarter turns and small rotations and scalings, one forward pass.
# L2-Net keeps the paper's objective (E2 as in the paper, E3 on inner products of the maps):
# in equal short runs it validated better than E3 on cosine similarities or no E3, and far
# better than no E2.
_DEFAULT_HARDNET: dict[str, Any] = {
    "loss": "hardnet",
    "optimizer": "sgd",
    "lr": 10.0,
    "weight_decay": 1e-4,
    "dampening": 0.9,
}
_DEFAULT_SOSNET: dict[str, Any] = {
    "loss": "sosnet",
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
}
_DEFAULT_L2NET: dict[str, Any] = {
    "loss": "l2net",
    "optimizer": "adam",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "loss_options": {"e2": "paper", "e3": "inner"},
}

#: method -> recipe name -> settings (over :data:`BASE_RECIPE`).
TRAINING_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "l2net": {"default": _DEFAULT_L2NET, "paper": _L2NET_PAPER},
    "l2net-cs": {"default": _DEFAULT_L2NET, "paper": _L2NET_PAPER},
    "hardnet": {"default": _DEFAULT_HARDNET, "paper": _HARDNET_PAPER},
    "sosnet": {"default": _DEFAULT_SOSNET, "paper": _SOSNET_PAPER},
    "sosnet-cs": {"default": _DEFAULT_SOSNET, "paper": _SOSNET_PAPER},
}

# The baseline losses' papers: the contrastive loss with its hinge on the squared distance,
# the triplet loss on squared distances with random negatives (their ``LOSS_VARIANTS``
# defaults); pairs and triplets drawn uniformly over the data.
LOSS_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "contrastive": {
        "default": {},
        "paper": {"sampler": "random", "loss_options": {"form": "squared"}},
    },
    "triplet": {
        "default": {},
        "paper": {"sampler": "random", "loss_options": {"form": "squared", "mining": "random"}},
    },
}


def recipe_settings(method: str, name: str, loss: str | None = None) -> dict[str, Any]:
    """The settings of recipe ``name`` for ``method`` (trained with ``loss``, None: the
    recipe's own): :data:`BASE_RECIPE`, then the method's recipe, then, for a loss other than
    the method's own, that loss's recipe (its options replace the method loss's options).

    A method without recipes (none in :data:`TRAINING_RECIPES`) has only ``default``: the
    base. ``ConfigError`` for an unknown name or a ``paper`` recipe the method lacks."""
    if name not in RECIPE_NAMES:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(RECIPE_NAMES)}")
    table = TRAINING_RECIPES.get(method)
    if table is None and name != "default":
        raise ConfigError(f"{method} has no {name} recipe; valid: default")
    out = {**BASE_RECIPE, **((table or {}).get(name) or {})}
    out["loss_options"] = dict(out.get("loss_options") or {})
    if loss is not None and loss != out.get("loss"):
        extra = LOSS_RECIPES.get(loss, {}).get(name, {})
        out = {**out, **extra, "loss": loss, "loss_options": dict(extra.get("loss_options", {}))}
    return out
