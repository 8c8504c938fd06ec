"""Training the keypoint frame refiner (:class:`~descmatch.nets.frames.FrameNet`):
``descmatch train --method frames``.

Data: photo pairs made as for the descriptors (:func:`~descmatch.train.photos.photo_pairs`: a
random homography with camera tilt, photometric change, SIFT keypoints detected in both
images and paired when they agree in position), each pair kept with the detector's two
frames and the homography's Jacobian at the source keypoint. Every photo source gives one
pool, a compressed ``.npz`` in ``<out>/pools`` named by its settings (reused on resume).
About 5% of the photos (every 20th from the 11th, or the last) make the validation pairs and are not
trained on.

Loss (:func:`frame_losses`): the refined source orientation, mapped through the Jacobian as a
gradient direction, against the refined warp orientation (``1 - cos`` of the angle between
them), plus the squared log ratio of the refined source size, scaled by the local scale, to
the refined warp size; plus the squared batch means of the rotations and log scales
(``mean_weight``), which fixes the one thing the pairs leave free (one rotation or rescaling
of every frame).

With ``--frame-loss descriptor`` (:func:`resample`, AffNet/OriNet's way), the pools keep
each patch with its surround (``CONTEXT`` windows, ``CONTEXT_PX`` pixels), the pair's patches
are re-cut from it in the refined frames (differentiable in the rotation and scale), and a
frozen descriptor net (``--teacher``; a central-surround one from a second pool cut over
twice the context) describes them; the loss is HardNet's
hardest-in-batch margin loss with the negatives held constant (only matching pairs are pulled
together), plus ``covariant_weight`` times the covariant loss. Both objectives add
``mean_weight`` times the squared batch means of the rotations and log scales: negatives held
constant, nothing else stops the teacher from pulling every frame one way (larger windows
bring any pair closer), which would not carry over to other nets. What the teacher cannot tell
apart, the refiner need not fix; what it can, the refiner fixes first.

Validation: the share of held-out pairs whose frames disagree by more than 30 degrees or 1.5x
(the tolerance of ``framed@3`` in ``eval homography``) before and after refinement; with a
teacher, also the share of pairs that are mutual nearest neighbours among 1024.
Training runs through :class:`~descmatch.train.trainer.Trainer` (:class:`FrameObjective`):
checkpoints, logs, the time limit and the resume rules are those of every method; batch
``s`` is drawn with a random stream of ``(seed, s)`` alone, so ``--resume`` continues
exactly. The pools: :mod:`.framepool`; the losses and validation: :mod:`.framelosses`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..describe import check_size_pool
from ..errors import ConfigError
from ..nets import NETS
from ..nets.frames import FrameNet
from ..nets.l2net import CentralSurround
from ..patches import DEFAULT_MR_SIZE
from ..weights import load_net, weights_method
from .data import DataSpec
from .framelosses import (
    _batch_losses,
    _teacher_descriptors,
    frame_losses,
    mutual_nn_share,
    resample,
    validate,
)
from .framepool import CONTEXT, CONTEXT_PX, FIELDS, build_frame_pool, load_frame_pools
from .losses import hardnet_loss
from .objective import Objective, RunEnv, RunSettings, StepContext
from .recipe import Recipe
from .trainer import Trainer

Progress = Any
OBJECTIVES = ("covariant", "descriptor")
_VAL_COLUMNS = (
    "detector_off",
    "refined_off",
    "detector_angle_off",
    "refined_angle_off",
    "detector_scale_off",
    "refined_scale_off",
    "val_loss",
)
_TEACHER_COLUMNS = ("detector_mnn", "refined_mnn", "val_descriptor_loss")


@dataclass
class FramesConfig:
    """A frame-refiner training run (stored in its checkpoints and logs)."""

    data: list[str]
    out_dir: Path
    steps: int = 1500
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    max_tilt: float = 4.0
    pair_angle: float = 75.0
    pair_scale: float = 1.8
    pairs_per_image: int = 300
    max_images: int | None = None
    eval_every: int = 500
    checkpoint_every: int = 500
    resume: bool = False
    time_limit_s: float | None = None
    init: str | None = None
    net_conf: dict[str, Any] = field(default_factory=dict)
    objective: str = "covariant"
    teacher: str | None = None
    covariant_weight: float = 0.0
    mean_weight: float = 1.0
    teacher_size_pool: tuple[float, ...] = (1.0,)
    command: str = ""
    precision: str = "fp32"
    log_every: int = 20

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.steps < 1 or self.batch_size < 2 or not self.lr > 0:
            raise ConfigError("frames: needs steps >= 1, batch size >= 2 and lr > 0")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"--frame-loss {self.objective}: choose one of {', '.join(OBJECTIVES)}"
            )
        if (self.objective == "descriptor") != (self.teacher is not None):
            raise ConfigError(
                "--frame-loss descriptor needs --teacher (the descriptor weights "
                "it trains through), and --teacher needs --frame-loss descriptor"
            )
        if self.covariant_weight and self.objective != "descriptor":
            raise ConfigError("--covariant-weight adds to --frame-loss descriptor")
        if self.covariant_weight < 0 or self.mean_weight < 0:
            raise ConfigError("frames: needs covariant and mean weights >= 0")
        self.teacher_size_pool = check_size_pool(
            tuple(self.teacher_size_pool), "--teacher-size-pool"
        )
        if self.teacher_size_pool != (1.0,) and self.teacher is None:
            raise ConfigError("--teacher-size-pool applies to --frame-loss descriptor")

    @property
    def context(self) -> bool:
        """Whether the pools keep the surround of each patch (the descriptor objective)."""
        return self.objective == "descriptor"

    def run_settings(self) -> RunSettings:
        """How the Trainer drives this run."""
        return RunSettings.of(self)


class FrameObjective(Objective):
    """The frame refiner learnt from photo pairs (see the module docstring)."""

    method = "frames"

    def __init__(self, cfg: FramesConfig) -> None:
        self.cfg = cfg
        self.recipe = Recipe("adam", lr=cfg.lr, schedule="linear")
        self.batch_size = cfg.batch_size
        self.eval_every = cfg.eval_every
        self.teacher: nn.Module | None = None
        self.teacher_info: dict[str, Any] = {}
        self.train_columns = ("angle_loss", "scale_loss")
        self.val_columns = _VAL_COLUMNS
        if cfg.teacher is not None:
            self.train_columns += ("descriptor_loss",)
            self.val_columns += _TEACHER_COLUMNS

    def settings(self) -> dict[str, Any]:
        d = asdict(self.cfg)
        d["out_dir"] = str(self.cfg.out_dir)
        d["data"] = [str(x) for x in self.cfg.data]
        d["method"] = self.method
        return d

    def check(self, env: RunEnv) -> None:
        """Photo folders only, one process, and the teacher's weights (before anything is
        written)."""
        self.sources = []
        for d in self.cfg.data:
            spec = DataSpec.parse(d)
            if spec.kind != "photos":
                raise ConfigError(f"--data {d}: the frame refiner trains on photos: sources only")
            if not spec.path.is_dir():
                raise ConfigError(f"--data {d}: no such folder")
            self.sources.append(spec.path)
        if not self.sources:
            raise ConfigError("--data is required (e.g. --data photos:PHOTO_FOLDER)")
        if env.dist.active:
            raise ConfigError("--method frames trains in one process (no torchrun)")
        self.env = env
        if self.cfg.teacher is not None:
            self.teacher, t_path, t_sha = _load_teacher(self.cfg.teacher, env.device)
            self.teacher_info = {"teacher": str(t_path), "teacher_sha256": t_sha}

    def open(self, env: RunEnv) -> None:
        out = self.cfg.out_dir / "pools"
        surround = isinstance(self.teacher, CentralSurround)
        pools = [
            build_frame_pool(p, out, self.cfg, env.progress, surround=surround)
            for p in self.sources
        ]
        self.train = load_frame_pools([p[0] for p in pools])
        self.val = load_frame_pools([p[1] for p in pools])
        self.num_pairs = len(self.train["a1"])

    def build_net(self, conf: dict[str, Any] | None) -> nn.Module:
        if conf is not None:
            return FrameNet(conf)
        init = load_net("frames", self.cfg.init).net if self.cfg.init else None
        net = FrameNet({**(init.conf if init else {}), **self.cfg.net_conf})
        if init is not None:
            _init_from(net, init, str(self.cfg.init))  # type: ignore[arg-type]
        return net

    def batch(self, step: int) -> dict[str, Tensor]:
        rng = np.random.default_rng([self.cfg.seed, step, 31])
        idx = torch.from_numpy(rng.integers(0, self.num_pairs, self.cfg.batch_size))
        return {k: v[idx] for k, v in self.train.items()}

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], ctx: StepContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        lo, ls, theta, rho, cut = _batch_losses(model, batch, ctx.device, autocast=ctx.autocast)
        mean = cfg.mean_weight * (theta.mean() ** 2 + rho.mean() ** 2)
        metrics = {"angle_loss": lo.detach().mean(), "scale_loss": ls.detach().mean()}
        if self.teacher is None:
            return lo.mean() + ls.mean() + mean, metrics
        d = _teacher_descriptors(self.teacher, cut, theta, rho, cfg.teacher_size_pool)
        ld = hardnet_loss(d[: len(lo)], d[len(lo) :], constant_negatives=True)
        metrics["descriptor_loss"] = ld.detach()
        return ld + cfg.covariant_weight * (lo.mean() + ls.mean()) + mean, metrics

    def validate(self, net: nn.Module) -> dict[str, float] | None:
        return validate(
            net,  # type: ignore[arg-type]
            self.val,
            self.env.device,
            self.teacher,
            teacher_size_pool=self.cfg.teacher_size_pool,
        )

    def headline(self, val: dict[str, float] | None) -> str:
        return _headline(val or {})

    def meta(self, val: dict[str, float] | None) -> dict[str, Any]:
        return {
            "data": ", ".join(str(d) for d in self.cfg.data),
            "mr_size": DEFAULT_MR_SIZE,
            "pairs": self.num_pairs,
            "val": val or {},
            **self.teacher_info,
        }


def train_frames(cfg: FramesConfig, progress: Progress | None = None) -> Path:
    """Run (or resume) a frame-refiner training; returns ``<out>/frames.pt``."""
    return Trainer(FrameObjective(cfg), cfg.run_settings(), progress).run()


def _load_teacher(spec: str, device: torch.device) -> tuple[nn.Module, Path, str]:
    """The frozen descriptor net of the descriptor objective (a file or shipped name of a
    plain or central-surround net) -> (net, path, sha256)."""
    method = weights_method(spec, "sosnet")
    if method is None or method not in NETS:
        raise ConfigError(f"--teacher {spec}: not descmatch descriptor weights")
    loaded = load_net(method, spec)
    net = loaded.net.eval().to(device)
    net.requires_grad_(False)
    return net, loaded.path, loaded.sha256


def _init_from(net: FrameNet, init: FrameNet, spec: str) -> None:
    """Start ``net`` from the frame-refiner ``init`` (read from ``spec``); a scale-only
    refiner starts a rotating one (the rotation output at zero)."""
    state = init.state_dict()
    own = net.state_dict()
    w, b = state["head.weight"], state["head.bias"]
    if w.shape[0] == 1 and own["head.weight"].shape[0] == 2:
        state = {
            **state,
            "head.weight": torch.cat([torch.zeros_like(w), w]),
            "head.bias": torch.cat([torch.zeros_like(b), b]),
        }
    try:
        net.load_state_dict(state)
    except RuntimeError:
        raise ConfigError(f"--init {spec}: does not fit a frame net with {net.conf}") from None


def _headline(m: dict[str, float]) -> str:
    nan = float("nan")
    text = (
        f"frames off (>30 deg or >1.5x): detector {m.get('detector_off', nan):.3f} -> "
        f"refined {m.get('refined_off', nan):.3f}"
    )
    if "refined_mnn" in m:
        text += f"; mutual NN: detector {m['detector_mnn']:.3f} -> refined {m['refined_mnn']:.3f}"
    return text


__all__ = [
    "CONTEXT",
    "CONTEXT_PX",
    "FIELDS",
    "FramesConfig",
    "FrameObjective",
    "build_frame_pool",
    "frame_losses",
    "mutual_nn_share",
    "resample",
    "train_frames",
    "validate",
]
