"""Distillation: a compact student net learns a teacher pipeline's descriptors, as an objective
of :class:`~descmatch.train.trainer.Trainer` (checkpoints, exact resume, logs, time limit).

``train_distill(DistillConfig(...))`` returns ``<out_dir>/student.pt``. What it does:

* teacher (``teacher``): ``auto`` is the shipped default pipeline (weights/DEFAULT's net, the
  shipped frame refiner, size pooling), run in fp32 (:func:`~.distillpool.load_teacher`);
* data: ``photos:PATH``, ``multiview:PATH`` (scenes with ``cameras.txt``) or ``pool:PATH`` (a
  distillation pool), each ``@WEIGHT``; photo and multi-view sources become distillation pools
  under ``<out_dir>/pools`` once (:mod:`.distillpool`): the student's patch of every
  observation, cut ONCE in the detector's frame, and the teacher's descriptor of that
  keypoint (its own refined frames and size pooling on the same image), so the teacher never
  runs during training and the student learns the refiner and the pooling too;
* frames (``frames``, optional): a frame refiner of the student's own; its patches are then
  cut in that refiner's frames (pools record its sha256), a copy of the refiner is written
  beside the student as ``student-frames.pt`` and the student's meta names it, so that
  describing with the student refines the frames with it first;
* batches: one source per batch (drawn by weight), its points chosen by the ``same-image``
  sampler (``images_per_batch`` photos or anchor images, hard negatives), each point's anchor
  and another of its views; no augmentation (the teacher's descriptors are of the patches as
  cut); batch ``s`` is a pure function of ``(seed, s)``;
* loss: ``distill_weight`` x the mean squared distance of each student descriptor to its
  teacher descriptor (both unit length: 2 - 2 cos), plus ``similarity_weight`` x the mean
  squared difference of the anchors-by-positives similarity matrices of student and teacher
  (the batch's relations, hard negatives included), plus ``hardnet_weight`` x HardNet's
  hardest-in-batch margin loss on the student's pairs;
* validation: ``val_fraction`` of the first source's images held out; FPR95 of the student and
  of the teacher on the same verification pairs (matching views, and a view of another point of
  the same image as the negative) and the mean cosine between student and teacher.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from ..errors import ConfigError
from ..nets import build_net
from ..patches import DEFAULT_MR_SIZE, WindowFactor, window_factor_of
from .data import DataSpec
from .distillpool import (
    Teacher,
    build_multiview_distill_pool,
    build_photo_distill_pool,
    load_teacher,
)
from .distillval import DistillValSet
from .evaluation import describe_patches
from .losses import hardnet_loss
from .objective import Objective, RunEnv, RunSettings, StepContext
from .photos import PhotoPairConfig
from .poolbuild import frames_settings
from .recipe import Recipe
from .samplers import SamplerOptions, make_sampler
from .teacherpool import TeacherPool
from .trainer import Trainer

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
DISTILL_KINDS = ("photos", "multiview", "pool")


@dataclass
class DistillConfig:
    """Everything a distillation run depends on (stored in its checkpoints and logs).

    ``net_conf`` configures the student (:class:`~descmatch.nets.student.StudentNet`:
    ``width``, ``dim``). ``pairs_per_image`` caps the pairs of a photo and
    ``points_per_image`` the points anchored in one multi-view image; ``max_tilt``,
    ``pair_angle`` and ``pair_scale`` make the photo pairs (:meth:`photo_conf`). See the
    module docstring for the data, the loss weights and validation."""

    data: list[str] = field(default_factory=list)
    out_dir: Path = Path("runs/distill")
    teacher: str = "auto"
    net_conf: dict[str, Any] = field(default_factory=dict)
    steps: int = 10000
    batch_size: int = 256
    images_per_batch: int = 4
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "linear"
    warmup_steps: int = 0
    distill_weight: float = 1.0
    similarity_weight: float = 10.0
    hardnet_weight: float = 0.5
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 500
    eval_every: int | None = None
    log_every: int = 20
    val_fraction: float = 0.05
    val_points: int = 4000
    eval_batch_size: int = 512
    resume: bool = False
    time_limit_s: float | None = None
    mr_size: float = DEFAULT_MR_SIZE
    pairs_per_image: int = 128
    points_per_image: int = 500
    max_tilt: float = 1.0
    pair_angle: float = 30.0
    pair_scale: float = 1.2
    max_images: int | None = None
    frames: str | None = None
    command: str = ""

    def check(self) -> None:
        if not self.data:
            raise ConfigError("no training data: give at least one data source")
        if self.batch_size < 2 or self.images_per_batch < 1:
            raise ConfigError("batch_size must be >= 2 and images_per_batch >= 1")
        weights = (self.distill_weight, self.similarity_weight, self.hardnet_weight)
        if min(weights) < 0 or max(weights) <= 0:
            raise ConfigError("loss weights must be >= 0 and not all 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0,1), got {self.val_fraction}")
        for s in self.data:
            if DataSpec.parse(s).kind not in DISTILL_KINDS:
                raise ConfigError(
                    f"{s}: distillation data is photos:PATH, multiview:PATH or pool:PATH"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["data"] = [str(DataSpec.parse(s)) for s in self.data]
        return dict(json.loads(json.dumps(out, default=str)))

    def run_settings(self) -> RunSettings:
        """How the Trainer drives this run."""
        return RunSettings.of(self)

    def photo_conf(self) -> PhotoPairConfig:
        """How the pairs of photo sources are made: camera tilts up to ``max_tilt``,
        detected keypoints paired within ``pair_angle`` degrees and ``pair_scale``."""
        return PhotoPairConfig.of_pairs(self.max_tilt, self.pair_angle, self.pair_scale)


class _Features(nn.Module):
    """The net's ``forward_features`` as ``forward`` (what DistributedDataParallel wraps)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        return self.net.forward_features(x)  # type: ignore[operator,no-any-return]


def _sub_seed(seed: int, k: int) -> int:
    return int(np.random.SeedSequence([seed, k, 43]).generate_state(1)[0])


class DistillObjective(Objective):
    """The student regressing onto cached teacher descriptors (see the module docstring)."""

    method = "student"
    train_columns = ("distill", "similarity", "hardnet", "cos", "batch_acc")
    val_columns = ("fpr95", "teacher_fpr95", "val_cos")

    def __init__(self, config: DistillConfig) -> None:
        config.check()
        self.config = config
        self.batch_size = config.batch_size
        self.recipe = Recipe(
            optimizer="adam",
            lr=config.lr,
            weight_decay=config.weight_decay,
            schedule=config.lr_schedule,
            warmup_steps=config.warmup_steps,
        )
        self.val: DistillValSet | None = None
        self.teacher_settings: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def check(self, env: RunEnv) -> None:
        self.env = env
        build_net("student", self.config.net_conf)  # unknown keys fail before any work
        if self.config.frames is not None:
            from ..weights import load_net

            load_net("frames", self.config.frames)  # a frame refiner, or fail now

    def _open_source(self, spec: DataSpec, teacher: Teacher | None) -> TeacherPool:
        c = self.config
        if spec.kind == "pool":
            return TeacherPool.load(spec.path)
        assert teacher is not None
        p, wf = self.student_cut
        root = Path(c.out_dir) / "pools"
        prog = self.env.progress

        def cb(i: int, n: int, msg: str) -> None:
            if prog:
                prog(i, n, f"distill pool {spec.path.name}: {msg}")

        if spec.kind == "photos":
            if not spec.path.is_dir():
                raise ConfigError(f"{spec.path}: no such photo folder")
            out = build_photo_distill_pool(
                spec.path, root, teacher, p, c.mr_size, wf, c.pairs_per_image, c.seed,
                c.photo_conf(), c.max_images, cb, frames=c.frames,
            )  # fmt: skip
        else:
            out = build_multiview_distill_pool(
                spec.path, root, teacher, p, c.mr_size, wf, c.seed, c.points_per_image, cb,
                frames=c.frames,
            )  # fmt: skip
        return TeacherPool.load(out)

    def open(self, env: RunEnv) -> None:
        c, d = self.config, env.dist
        if not d.main:
            d.barrier()
        self.specs = specs = [DataSpec.parse(s) for s in c.data]
        self.student_cut = self.student_input()
        needs_teacher = any(s.kind != "pool" for s in specs)
        teacher = load_teacher(c.teacher) if needs_teacher else None
        pools = [self._open_source(s, teacher) for s in specs]
        self.mr_size = float(pools[0].meta.get("mr_size", c.mr_size))
        self.frames_sha256 = frames_settings(c.frames).get("frames_sha256")
        for s, pool in zip(specs, pools, strict=True):
            meta = pool.meta
            cut = (meta.get("patch_size"), window_factor_of(meta.get("window_factor", 1.0)))
            if cut != self.student_cut:
                raise ConfigError(f"{s}: the pool is not cut for the student's input")
            if float(meta.get("mr_size", c.mr_size)) != self.mr_size:
                raise ConfigError(
                    f"{s}: the pool's patches are cut at mr_size {meta.get('mr_size')}, "
                    f"the first source's at {self.mr_size}; use pools cut alike"
                )
            if meta.get("frames_sha256") != self.frames_sha256:
                raise ConfigError(
                    f"{s}: the pool's patches are cut in {_frames_words(meta.get('frames_sha256'))}"
                    f", the run's in {_frames_words(self.frames_sha256)}; give --frames the "
                    "refiner that cut the pool"
                )
        self.teacher_settings = dict(pools[0].meta.get("teacher", {}))
        if any(dict(p.meta.get("teacher", {})) != self.teacher_settings for p in pools):
            raise ConfigError("the data sources were described by different teachers")
        dim = int(pools[0].teacher.shape[1])
        self.net_conf = {"dim": dim, **c.net_conf}
        if int(self.net_conf["dim"]) != dim:
            raise ConfigError(
                f"the student's dimension {self.net_conf['dim']} is not the teacher's {dim}"
            )
        train_part, held = pools[0].split(c.val_fraction, c.seed)
        assert isinstance(train_part, TeacherPool) and isinstance(held, TeacherPool)
        pools[0] = train_part
        if d.main:
            self.val = DistillValSet.of(held, c.val_points, c.seed)
        if c.frames is not None and d.main:
            _copy_refiner(c.frames, self.frames_sha256, Path(c.out_dir) / STUDENT_FRAMES)
        if d.active and d.main:
            d.barrier()
        self.pools = pools
        w = np.asarray([s.weight for s in specs], np.float64)
        if (w < 0).any() or w.sum() <= 0:
            raise ConfigError("data weights must be >= 0 and not all 0")
        self.weights = w / w.sum()
        opts = SamplerOptions(images_per_batch=c.images_per_batch)
        self.samplers = [
            make_sampler("same-image", p, c.batch_size, opts, _sub_seed(c.seed, k))
            for k, p in enumerate(pools)
        ]
        self.rank, self.world = (d.rank, d.world_size) if d.active else (0, 1)
        points = sum(p.num_points for p in pools)
        self.eval_every = max(1, -(-points // c.batch_size))
        self.data_desc = "; ".join(
            f"{s} ({p.num_points} points)" for s, p in zip(specs, pools, strict=True)
        )
        log.info("data: %s", self.data_desc)

    def student_input(self) -> tuple[int, WindowFactor]:
        """The patch size and window factor(s) the configured student takes."""
        net = build_net("student", self.config.net_conf)
        return net.patch_size, net.window_factor

    def build_net(self, conf: dict[str, Any] | None) -> nn.Module:
        """The student; its dimension is the teacher's unless ``net_conf`` says otherwise."""
        return build_net("student", conf if conf is not None else self.net_conf)

    def train_module(self, net: nn.Module) -> nn.Module:
        return _Features(net)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Patches (B,2,P,P) or (B,2,views,P,P) uint8 and the teacher's descriptors (B,2,D)
        float16."""
        rng = np.random.default_rng([self.config.seed, int(step), 17])
        k = int(rng.choice(len(self.pools), p=self.weights)) if len(self.pools) > 1 else 0
        pts = self.samplers[k].batch_points(rng, int(step))
        if self.world > 1:
            pts = pts[self.rank :: self.world]
        pool = self.pools[k]
        rows = pool.gather_rows(pts, rng)
        return pool.read(rows), np.asarray(pool.teacher[rows.reshape(-1)]).reshape(*rows.shape, -1)

    def loss(
        self, model: nn.Module, batch: tuple[np.ndarray, np.ndarray], ctx: StepContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c = self.config
        patches, teacher = batch
        b, p = patches.shape[0], patches.shape[-1]
        x = torch.from_numpy(patches).to(ctx.device).float().div_(255.0)
        inp = x.transpose(0, 1).reshape(2 * b, -1, p, p)  # (2B,views,P,P)
        t = torch.from_numpy(teacher).to(ctx.device).float().transpose(0, 1).reshape(2 * b, -1)
        t = torch.nn.functional.normalize(t, dim=1)
        with ctx.autocast():
            desc, _ = model(inp)
        desc = desc.float()
        l_distill = (desc - t).pow(2).sum(1).mean()
        a, pos, ta, tp = desc[:b], desc[b:], t[:b], t[b:]
        l_sim = (a @ pos.t() - ta @ tp.t()).pow(2).mean()
        l_hard = hardnet_loss(a, pos)
        loss = c.distill_weight * l_distill + c.similarity_weight * l_sim
        loss = loss + c.hardnet_weight * l_hard
        with torch.no_grad():
            acc = (torch.mm(a, pos.t()).argmax(1) == torch.arange(b, device=a.device)).float()
            cos = (desc * t).sum(1).mean()
        return loss, {
            "distill": l_distill.detach(),
            "similarity": l_sim.detach(),
            "hardnet": l_hard.detach(),
            "cos": cos,
            "batch_acc": acc.mean(),
        }

    def validate(self, net: nn.Module) -> dict[str, float] | None:
        v = self.val
        if v is None:
            return None
        with self.env.autocast():
            desc = describe_patches(net, v.patches, self.env.device, self.config.eval_batch_size)
        return v.scores(desc)

    def headline(self, val: dict[str, float] | None) -> str:
        if not val:
            return ""
        return f"val FPR95 {val['fpr95']:.4f} (teacher {val['teacher_fpr95']:.4f})"

    def progress_text(self, loss: float, val: dict[str, float] | None) -> str:
        return f"loss {loss:.4f}" + (f" fpr95 {val['fpr95']:.4f}" if val else "")

    def meta(self, val: dict[str, float] | None) -> dict[str, Any]:
        c = self.config
        return {
            "data": self.data_desc,
            "data_sources": [str(s) for s in self.specs],
            "teacher": self.teacher_settings,
            "loss": "distill",
            "loss_weights": {
                "distill": c.distill_weight,
                "similarity": c.similarity_weight,
                "hardnet": c.hardnet_weight,
            },
            "val_fpr95": val["fpr95"] if val else None,
            "val_teacher_fpr95": val["teacher_fpr95"] if val else None,
            "val_cos": val["val_cos"] if val else None,
            "mr_size": self.mr_size,
            "patch_size": self.student_cut[0],
            # The student describes one patch, in the detector's frame or in its own
            # refiner's (a file beside the student's weights): no pooling.
            **(
                {"frames": STUDENT_FRAMES, "frames_sha256": self.frames_sha256}
                if self.frames_sha256
                else {"frames": "none"}
            ),
            "size_pool": [1.0],
        }


#: The file name of a student's own frame refiner, beside its weights.
STUDENT_FRAMES = "student-frames.pt"


def _frames_words(sha: str | None) -> str:
    return f"the frames of the refiner with sha256 {sha[:12]}" if sha else "the detector's frames"


def _copy_refiner(frames: str, frames_sha256: str | None, dest: Path) -> None:
    """Write the student's refiner (its sha256 known) beside its weights (atomically; kept
    when it is there)."""
    from ..weights import resolve, sha256

    src = resolve("frames", frames)
    if dest.is_file() and sha256(dest) == frames_sha256:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def train_distill(config: DistillConfig, progress: Progress | None = None) -> Path:
    """Distil ``config.teacher`` into a student on ``config.data``; return
    ``<out_dir>/student.pt`` (see the module docstring)."""
    return Trainer(DistillObjective(config), config.run_settings(), progress).run()
