"""How a net is optimised: the optimiser, its learning rate and the schedule (a
:class:`Recipe`), and the precision the forward passes run in.

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
