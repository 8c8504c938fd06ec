"""Training the descriptor nets: pools of pairs -> batches -> net -> loss, as an objective
of :class:`~descmatch.train.trainer.Trainer` (which owns checkpoints, resume, logs, DDP).

``train(TrainConfig(...))`` trains one net and returns ``<out_dir>/<method>.pt`` (a descmatch
weights file that :func:`descmatch.weights.load_net` loads). What it does, in order:

* data: each source of ``config.data`` is ``[KIND:]PATH[@WEIGHT]`` with KIND ``photos`` (a
  folder of photos, made into a pool under ``<out_dir>/pools`` once, see :mod:`.poolbuild`; a folder
  that already is a pool is used as it is), ``pool`` (a pool folder), ``brown`` (a
  Brown/PhotoTour folder), ``multiview`` (a scene folder with ``cameras.txt`` + ``images/``,
  or a folder of such scenes, made into a multi-view pool under ``<out_dir>/pools`` once, see
  :mod:`.multiview`; it must be named) or ``hpatches`` (an HPatches-style sequence, images
  1..N and ``H_1_i``, or a folder of them: pairs of detected keypoints that agree under the
  homography, made into a pool under ``<out_dir>/pools`` once, see :mod:`.hpatches`; it must
  be named); without KIND it is guessed. Each batch comes from one source, drawn with
  probability proportional to the weights; batch ``s`` is a pure function of ``(seed, s)``.
* recipe (``config.recipe``, :func:`~.recipe.recipe_settings`): ``default`` (the project's
  recipe, chosen by measurement) or ``paper`` (the method's paper: sampler, batch size,
  optimiser, schedule, dropout, augmentation, separate forward passes) fills every setting
  left None; settings given explicitly win. The resolved settings are the run's settings
  (checkpoint, logs, the weights' meta).
* sampler (how a batch's points are chosen in its source, :data:`~.samplers.SAMPLERS`):
  ``same-image`` (``images_per_batch`` photos, many points each, hard negatives),
  ``random`` (HardNet: distinct points uniformly over the pool), ``progressive`` (L2-Net:
  ``p1_fraction`` of the batch walks a shuffled sequence of the pool, the rest random) or
  ``hard-negative`` (groups of ``mine_group`` points close in descriptor space; the first
  patches of a random subset of ``mine_points`` points are described with the current net
  every ``mine_every`` steps; what was mined is kept in the checkpoint).
* validation: ``config.val`` (``brown:PATH``: a subsample of its m50 pairs; ``pool:PATH`` or
  ``photos:PATH``: a verification set with same-photo negatives) or, by default,
  ``val_fraction`` of the photos of the first source held out from training; FPR95 by
  :func:`~descmatch.train.evaluation.fpr_at_recall` every ``eval_every`` steps (default: once
  per epoch over the training points) and at the end. ``val="none"`` turns it off.
* batch: uint8 from the pool, to float on the device; with ``augment`` the same random flip
  and 90-degree rotation for both patches of a pair and an independent small rotation
  (``rotation_jitter`` degrees) and scale (``scale_jitter``) per patch (one ``affine_grid``);
  one forward pass for anchors and positives together, or two with ``separate_passes``
  (HardNet's code: each half its own batch-norm statistics); the loss in fp32 with
  ``loss_options`` (validated by :func:`~.losses.check_loss_options`).
* precision: ``auto`` is bf16 autocast on CPUs with bf16 support (about twice the fp32 speed
  measured on AVX512-BF16) and on CUDA devices that have it, else fp16 with a gradient scaler
  on CUDA, else fp32.
* optimiser (from the recipe; :data:`METHOD_DEFAULTS` for a method without recipes): HardNet
  trains with SGD, lr 10, momentum 0.9, dampening 0.9, weight decay 1e-4, linear decay to 0
  (the official code's values; the towers are scale invariant -- batch norm without affine,
  L2-normalised output -- so the step that matters is lr / |w|^2 and weight decay keeps it
  moving). The default recipes of L2-Net and SOSNet use Adam, lr 1e-3, no weight decay,
  linear decay to 0 (our choice: Adam suits short CPU runs; the papers trained far longer).
* checkpoints every ``checkpoint_every`` steps and at the end (``<out_dir>/checkpoint.pt``:
  weights, optimiser, scheduler, scaler, step, RNG states, config, what was mined);
  ``resume=True`` continues from it and gives the same batches, losses and weights as an
  uninterrupted run (the resume rules: :mod:`.checkpoint`).
* logs: ``train_log.csv`` and ``train_log.json`` in ``out_dir`` (step, loss, lr, fpr95,
  pairs/s, seconds, in-batch accuracy), both rewritten atomically.

* data-parallel: launched by ``torchrun --nproc_per_node N -m descmatch train ...`` (the
  environment has ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), :func:`train` joins the process
  group (gloo on the CPU; NCCL on CUDA, device ``cuda:LOCAL_RANK``), wraps the net in
  DistributedDataParallel and each rank takes rows ``rank::world_size`` of every global batch
  (``batch_size`` stays the global batch; the gradients are averaged over the ranks; batch norm
  sees each rank's rows). Rank 0 alone builds pools, validates, logs and writes checkpoints
  and weights; the checkpoint holds every rank's RNG state, so ``resume`` is exact with the
  same number of processes, and every checkpoint checks that the ranks' weights agree. The
  loss and accuracy logged are the ranks' mean. Hardest-in-batch losses see only a rank's rows:
  N processes do not give the same steps as one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, TrainingError
from ..nets import NETS, DescriptorNet, build_net, init_central_surround
from ..weights import load_net, weights_method
from .augment import augment_pairs
from .batches import MixedBatches
from .config import METHOD_DEFAULTS, OPTIMIZER_LR, TrainConfig
from .data import DataSpec, ValSet, brown_val, open_source, pool_val
from .evaluation import describe_patches, fpr_at_recall, pair_distances
from .losses import LOSSES, get_loss
from .objective import Objective, RunEnv, StepContext
from .poolbuild import frames_settings
from .recipe import (
    RECIPE_KEYS,
    Recipe,
)
from .runlog import hardware_name, read_log
from .trainer import Trainer

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


class _Features(nn.Module):
    """``forward`` is the net's ``forward_features``: what DistributedDataParallel wraps (its
    gradient hooks need the call to go through its own forward)."""

    def __init__(self, net: DescriptorNet, separate_passes: bool = False) -> None:
        super().__init__()
        self.net = net
        self.separate_passes = separate_passes

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Descriptors and intermediate maps of ``x``: the anchors (first half) and the
        positives (second half) in one pass, or with ``separate_passes`` in two (each with
        its own batch-norm statistics, as HardNet's code does).
        Shape: (2B,1,P,P) -> (2B,D), maps (2B,...)."""
        if not self.separate_passes:
            return self.net.forward_features(x)
        b = x.shape[0] // 2
        da, fa = self.net.forward_features(x[:b])
        dp, fp = self.net.forward_features(x[b:])
        return torch.cat([da, dp]), [torch.cat([u, v]) for u, v in zip(fa, fp, strict=True)]


class DescriptorObjective(Objective):
    """A descriptor net learnt from pairs of matching patches (see the module docstring)."""

    train_columns = ("batch_acc",)
    val_columns = ("fpr95",)

    def __init__(self, config: TrainConfig) -> None:
        self.config = config = config.with_recipe()
        self.opts = config.resolved()
        self.method = config.method
        self.batch_size = int(config.batch_size or 0)
        self.net_cls = NETS[config.method]
        self.recipe = Recipe(
            optimizer=self.opts["optimizer"],
            lr=self.opts["lr"],
            weight_decay=self.opts["weight_decay"],
            momentum=float(config.momentum or 0.0),
            dampening=float(config.dampening or 0.0),
            schedule=str(config.lr_schedule),
            warmup_steps=int(config.warmup_steps or 0),
        )
        self.loss_fn = get_loss(self.opts["loss"])
        self.random_loss = self.opts["loss"] in ("contrastive", "triplet")
        self.init_info: dict[str, Any] | None = None
        self.val: ValSet | None = None

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def check(self, env: RunEnv) -> None:
        c, d = self.config, env.dist
        if not c.data:
            raise ConfigError("no training data: give at least one data source")
        if c.steps < 1 or self.batch_size < 2:
            raise ConfigError("steps must be >= 1 and batch_size >= 2")
        if d.active and self.batch_size < 2 * d.world_size:
            raise ConfigError(
                f"batch size {self.batch_size} is too small for {d.world_size} "
                "processes (at least 2 pairs each)"
            )
        self.env = env
        c.rank, c.world_size = (d.rank, d.world_size) if d.active else (c.rank, c.world_size)

    def open(self, env: RunEnv) -> None:
        """Pools (built by rank 0 while the others wait, then opened by all) and validation."""
        c, d, net_cls = self.config, env.dist, self.net_cls
        if not d.main:
            d.barrier()
        self.specs = specs = [DataSpec.parse(s) for s in c.data]
        mr_sizes: list[float] = []
        pools = [open_source(s, net_cls, c, mr_sizes, env.progress) for s in specs]
        if len({round(m, 6) for m in mr_sizes}) > 1:
            raise ConfigError(f"data sources were cut with different mr_size: {sorted(mr_sizes)}")
        self.mr_size = mr_sizes[0] if mr_sizes else c.mr_size
        val_spec = (c.val or "").strip()
        if val_spec.lower() == "none":
            pass
        elif val_spec:
            if d.main:
                vs = DataSpec.parse(val_spec)
                if vs.kind == "brown":
                    self.val = brown_val(vs.path, net_cls.patch_size, c.val_pairs, c.seed)
                else:
                    vpool = open_source(vs, net_cls, c, [], env.progress)
                    self.val = pool_val(vpool, c.val_pairs, c.seed, str(vs))
        else:
            train_part, held = pools[0].split(c.val_fraction, c.seed)
            pools[0] = train_part
            if d.main:
                name = f"{len(held)} held-out points of {specs[0]}"
                self.val = pool_val(held, c.val_pairs, c.seed, name)
        if d.active and d.main:
            d.barrier()
        self.batches = MixedBatches(
            pools,
            [s.weight for s in specs],
            self.batch_size,
            int(c.images_per_batch or 0),
            c.seed,
            d.rank if d.active else c.rank,
            d.world_size if d.active else c.world_size,
            sampler=str(c.sampler),
            p1_fraction=float(c.p1_fraction or 0.0),
            mine_every=c.mine_every,
            mine_points=c.mine_points,
            mine_group=c.mine_group,
        )
        points = sum(p.num_points for p, s in zip(pools, specs, strict=True) if s.weight > 0)
        self.eval_every = max(1, -(-points // self.batch_size))  # once per epoch
        self.data_desc = "; ".join(
            f"{s} ({p.num_points} points)" for s, p in zip(specs, pools, strict=True)
        )
        log.info("data: %s", self.data_desc)

    def build_net(self, conf: dict[str, Any] | None) -> nn.Module:
        c = self.config
        if conf is not None:
            return build_net(c.method, conf)
        net = build_net(c.method, c.net_conf)
        if not c.init:
            return net
        # A central-surround net also starts from its plain net's weights (both towers).
        plain = getattr(self.net_cls, "plain", "")
        source = plain if plain and weights_method(c.init, c.method) == plain else c.method
        loaded = load_net(source, c.init)
        init_mr = float(loaded.meta.get("mr_size", self.mr_size))
        if abs(init_mr - self.mr_size) > 1e-6:
            raise ConfigError(
                f"{loaded.path}: trained on patches with mr_size {init_mr:g}, the "
                f"data is cut with {self.mr_size:g}"
            )
        if source == c.method:
            net = loaded.net
        else:
            init_central_surround(net, loaded.net)  # type: ignore[arg-type]
        self.init_info = {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "steps": loaded.meta.get("steps"),
            "pairs_seen": loaded.meta.get("pairs_seen"),
        }
        return net.train()

    def train_module(self, net: nn.Module) -> nn.Module:
        self.net = net
        return _Features(net, bool(self.config.separate_passes))  # type: ignore[arg-type]

    # Batches, hard-negative mining.

    def needs_refresh(self, step: int) -> bool:
        return self.batches.needs_mining(step)

    def refresh(self, step: int, net: nn.Module) -> None:
        import time

        t0 = time.perf_counter()
        self.batches.mine(step, self._describe_for_mining)
        log.info("step %d: mined hard negatives in %.1f s", step, time.perf_counter() - t0)

    def _describe_for_mining(self, patches: np.ndarray) -> np.ndarray:
        """Descriptors with the current net (eval mode, as validation), each rank describing
        its share of the patches and all of them gathered. Shape: (N,P,P) -> (N,D) float32."""
        env, net = self.env, self.net
        d, n = env.dist, len(patches)
        if d.active:
            per = -(-n // d.world_size)
            patches = patches[d.rank * per : (d.rank + 1) * per]
        with env.autocast():
            desc = describe_patches(net, patches, env.device, self.config.eval_batch_size)
        if not d.active:
            return desc
        buf = torch.zeros(per, desc.shape[1], device=env.device)
        buf[: len(desc)] = torch.from_numpy(desc).to(env.device)
        parts = [torch.empty_like(buf) for _ in range(d.world_size)]
        dist.all_gather(parts, buf)
        return torch.cat(parts)[:n].cpu().numpy()

    def batch(self, step: int) -> np.ndarray:
        return self.batches.batch(step)[0]

    def loss(
        self, model: nn.Module, batch: np.ndarray, ctx: StepContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        c, p = self.config, self.net_cls.patch_size
        x = torch.from_numpy(batch).to(ctx.device, non_blocking=True).float().div_(255.0)
        if c.augment:
            x = augment_pairs(
                x,
                ctx.generator,
                bool(c.flip_rot90),
                float(c.rotation_jitter or 0.0),
                float(c.scale_jitter or 0.0),
            )
        b = x.shape[0]
        inp = x.transpose(0, 1).reshape(2 * b, 1, p, p)
        with ctx.autocast():
            desc, feats = model(inp)
        desc = desc.float()
        a, pos = desc[:b], desc[b:]
        if self.opts["loss"] == "l2net":
            f1, f2 = [f[:b].float() for f in feats], [f[b:].float() for f in feats]
            loss = self.loss_fn(a, pos, f1, f2, **(c.loss_options or {}))
        elif self.random_loss:
            loss = self.loss_fn(a, pos, generator=ctx.generator, **(c.loss_options or {}))
        else:
            loss = self.loss_fn(a, pos, **(c.loss_options or {}))
        with torch.no_grad():
            acc = (torch.mm(a, pos.t()).argmax(1) == torch.arange(b, device=a.device)).float()
        return loss, {"batch_acc": acc.mean()}

    # Validation, meta, state.

    def validate(self, net: nn.Module) -> dict[str, float] | None:
        v = self.val
        if v is None:
            return None
        with self.env.autocast():
            desc = describe_patches(net, v.patches, self.env.device, self.config.eval_batch_size)
        return {"fpr95": fpr_at_recall(pair_distances(desc, v.idx0, v.idx1), v.is_match, 0.95)}

    def headline(self, val: dict[str, float] | None) -> str:
        return f"val FPR95 {val['fpr95']:.4f}" if val else ""

    def progress_text(self, loss: float, val: dict[str, float] | None) -> str:
        return f"loss {loss:.4f}" + (f" fpr95 {val['fpr95']:.4f}" if val else "")

    def meta(self, val: dict[str, float] | None) -> dict[str, Any]:
        c = self.config
        return {
            "data": self.data_desc,
            "data_sources": [str(s) for s in self.specs],
            "images_per_batch": c.images_per_batch,
            "sampler": c.sampler,
            "recipe": c.recipe,
            "recipe_settings": {k: getattr(c, k, None) for k in RECIPE_KEYS if k != "dropout"},
            "dropout": c.net_conf.get("dropout"),
            **self.opts,
            "val_fpr95": val["fpr95"] if val else None,
            "val_set": self.val.name if self.val else None,
            "mr_size": self.mr_size,
            "patch_size": self.net_cls.patch_size,
            **({"init": self.init_info} if self.init_info else {}),
            **({"frames": str(c.frames), **frames_settings(c.frames)} if c.frames else {}),
        }

    def state_dict(self) -> dict[str, Any] | None:
        return self.batches.mining_state()

    def load_state_dict(self, state: Any, meta: dict[str, Any]) -> None:
        self.batches.load_mining_state(state if isinstance(state, dict) else None)
        self.init_info = meta.get("init")


def train(config: TrainConfig, progress: Progress | None = None) -> Path:
    """Train ``config.method`` on ``config.data``; return ``<out_dir>/<method>.pt``.

    ``progress(step, steps, text)`` is called after every step (and while a photo pool is
    built). See the module docstring for what is done and written. Under torchrun (``RANK``,
    ``WORLD_SIZE`` > 1, ``LOCAL_RANK`` in the environment) this process joins the process group
    and trains its share of every batch; only rank 0 calls ``progress`` and writes.
    """
    objective = DescriptorObjective(config)
    return Trainer(objective, config.run_settings(), progress).run()


def default_loss(method: str) -> str:
    """The loss a method trains with by default."""
    return str(METHOD_DEFAULTS[method]["loss"])


__all__: Sequence[str] = [
    "TrainConfig",
    "DataSpec",
    "DescriptorObjective",
    "METHOD_DEFAULTS",
    "OPTIMIZER_LR",
    "LOSSES",
    "train",
    "augment_pairs",
    "hardware_name",
    "read_log",
    "TrainingError",
    "default_loss",
]
