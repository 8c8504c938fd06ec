"""The pieces an objective of :class:`~descmatch.train.trainer.Trainer` works with: the run's
settings, what it sees of the run (:class:`RunEnv`), one step (:class:`StepContext`), and the
:class:`Objective` base class (the interface is described in :mod:`.trainer`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import Dist
from ..errors import ConfigError
from .recipe import Recipe

Progress = Callable[[int, int, str], None]


@dataclass
class RunSettings:
    """How a run is driven (not what it learns): folder, length, seed, device, precision, how
    often it checkpoints, validates (``eval_every`` None: the objective's default) and logs,
    resume, the time limit (seconds of this call) and the command recorded in the weights."""

    out_dir: Path
    steps: int
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 500
    eval_every: int | None = None
    log_every: int = 20
    resume: bool = False
    time_limit_s: float | None = None
    command: str = ""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.steps < 1:
            raise ConfigError("steps must be >= 1")
        if self.checkpoint_every < 1 or self.log_every < 1 or (self.eval_every or 1) < 1:
            raise ConfigError("checkpoint, eval and log intervals must be >= 1")

    @classmethod
    def of(cls, config: Any) -> RunSettings:
        """The run settings of a training config with fields of the same names."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass
class RunEnv:
    """What an objective sees of the run: settings, device, processes, autocast, progress."""

    run: RunSettings
    device: torch.device
    dist: Dist
    autocast: Callable[[], AbstractContextManager[object]]
    progress: Progress | None = None
    precision: str = "fp32"


@dataclass
class StepContext:
    """One training step as the objective's ``loss`` sees it."""

    step: int
    generator: torch.Generator
    device: torch.device
    autocast: Callable[[], AbstractContextManager[object]]


class Objective:
    """What a run learns (see the module docstring). Subclasses set ``method``, ``recipe``,
    ``batch_size`` and implement ``build_net``, ``batch`` and ``loss``."""

    method: str = ""
    recipe: Recipe = Recipe()
    batch_size: int = 0
    eval_every: int = 500
    train_columns: tuple[str, ...] = ()
    val_columns: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        return {"method": self.method}

    def check(self, env: RunEnv) -> None:
        """Cheap checks before the run folder is made."""

    def open(self, env: RunEnv) -> None:
        """Open (or build) the data and the validation set."""

    def build_net(self, conf: dict[str, Any] | None) -> nn.Module:
        raise NotImplementedError

    def train_module(self, net: nn.Module) -> nn.Module:
        return net

    def needs_refresh(self, step: int) -> bool:
        return False

    def refresh(self, step: int, net: nn.Module) -> None:
        """Work that needs the current net before batch ``step`` (every rank calls it)."""

    def batch(self, step: int) -> Any:
        raise NotImplementedError

    def loss(
        self, model: nn.Module, batch: Any, ctx: StepContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def validate(self, net: nn.Module) -> dict[str, float] | None:
        return None

    def headline(self, val: dict[str, float] | None) -> str:
        return ""

    def progress_text(self, loss: float, val: dict[str, float] | None) -> str:
        return f"loss {loss:.4f}"

    def meta(self, val: dict[str, float] | None) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: Any, meta: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume (ignore what does not fit); ``meta`` is the
        checkpoint's weights meta."""
