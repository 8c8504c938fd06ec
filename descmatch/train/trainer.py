"""The training engine: one :class:`Trainer` runs every trainable net of descmatch.

What to learn is an :class:`Objective`; how to run it is the Trainer's: the run folder, the
optimiser and schedule (from the objective's :class:`~descmatch.train.recipe.Recipe`),
bf16/fp16 autocast, batches prepared one step ahead in a thread, checkpoints and exact resume
(:mod:`.checkpoint`), data-parallel processes, validation, logs (:mod:`.runlog`), progress and
the time limit. The descriptor nets (:class:`~descmatch.train.descriptors.DescriptorObjective`)
and the frame refiner (:class:`~descmatch.train.frames.FrameObjective`) are objectives.

The objective interface (override what applies; see :class:`Objective`):

* ``method`` (the net's registry name: the weights are ``<out>/<method>.pt``), ``recipe``,
  ``batch_size`` (pairs per global step, for the logs), ``settings()`` (the run's settings as
  JSON: stored in the checkpoint and compared on resume), ``train_columns`` and
  ``val_columns`` (the metrics :meth:`~Objective.loss` and :meth:`~Objective.validate` return,
  in log order).
* ``check(env)``: cheap checks before anything is written (settings, a teacher net's file);
  ``open(env)``: the data (pools built by rank 0 while the other ranks wait) and the
  validation set; ``eval_every`` may be set here (a default in steps).
* ``build_net(conf)``: a fresh net (after ``torch.manual_seed(seed)``; starting from
  ``--init`` weights when the objective has them), or, on resume, the checkpoint's net conf
  (``conf`` given; its weights are then loaded by the Trainer). ``train_module(net)`` is what
  the data-parallel wrapper wraps and what ``loss`` calls (default: the net).
* ``batch(step)``: the CPU batch of global step ``step`` for this rank: a pure function of the
  seed and the step (never of earlier calls), so a resumed run sees the same batches; it runs
  in the prefetch thread. ``needs_refresh(step)`` / ``refresh(step, net)``: work that must
  see the current net before batch ``step`` is made (hard-negative mining), on the main
  thread, every rank taking part.
* ``loss(model, batch, ctx)`` -> ``(loss, metrics)``: the scalar to minimise and detached
  scalar tensors to log (averaged over the ranks). ``ctx`` (:class:`StepContext`) holds the
  step, a CPU generator that is a pure function of (seed, step) for the step's own random
  numbers (augmentation, random negatives), the device, and ``ctx.autocast()`` for the
  forward passes (losses stay in fp32).
* ``validate(net)`` -> metrics or None (rank 0, net in eval mode), ``headline(val)``,
  ``meta(val)`` (what the weights file records besides the Trainer's own entries),
  ``state_dict()`` / ``load_state_dict(state, meta)`` (the objective's state that a
  checkpoint must carry, e.g. what was mined).

Two users this shape is meant for: a distillation objective (a student regressing onto a
frozen teacher's descriptors plus HardNet's loss) loads its teacher in ``check``, describes
the batch with it inside ``loss`` under ``torch.no_grad()`` (or in ``batch`` from cached
descriptors) and adds both terms; a per-method recipe (batch size, sampler, optimiser,
schedule, separate anchor and positive forward passes) is the objective's ``recipe``, its
``batch`` and its ``loss``: the Trainer does not know how a batch is composed or forwarded.

Data-parallel: under ``torchrun`` (``RANK``, ``WORLD_SIZE`` > 1, ``LOCAL_RANK``) the Trainer
joins the process group (gloo on the CPU, NCCL on CUDA, ``cuda:LOCAL_RANK``), wraps
``train_module`` in DistributedDataParallel, and rank 0 alone validates, logs and writes; the
checkpoint holds every rank's random state and checks the ranks' weights agree.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__ as _version
from ..device import resolve_device
from ..distributed import Dist, launch_env, local_device, session
from ..errors import ConfigError, InputError, OutputError, TrainingError
from ..weights import save_checkpoint
from .checkpoint import CHECKPOINT, check_resume, read_checkpoint
from .objective import Objective, RunEnv, RunSettings, StepContext
from .recipe import autocast_dtype, autocast_factory
from .runlog import hardware_name, read_log, write_logs

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step's own random numbers: a pure function of (seed, step)."""
    s = int(np.random.default_rng([seed, step, 23]).integers(0, 2**62))
    return torch.Generator().manual_seed(s)


def _weights_digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for v in net.parameters():
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _row(
    step: int,
    iv: _Interval,
    optimizer: torch.optim.Optimizer,
    val: dict[str, float] | None,
    obj: Objective,
    elapsed: float,
) -> dict[str, Any]:
    """A log row: means over the interval, the validation of this step (or None)."""
    n = max(iv.n, 1)
    return {
        "step": step,
        "loss": round(iv.loss / n, 6),
        "lr": optimizer.param_groups[0]["lr"],
        **{k: (val or {}).get(k) for k in obj.val_columns},
        **{k: v for k, v in (val or {}).items() if k not in obj.val_columns},
        "pairs_per_s": round(iv.n * obj.batch_size / max(iv.seconds, 1e-9), 1),
        "seconds": round(elapsed, 2),
        **{k: round(v / n, 6) for k, v in iv.metrics.items()},
    }


@dataclass
class _Interval:
    """Sums over the steps since the last log row."""

    n: int = 0
    seconds: float = 0.0
    loss: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, loss: float, metrics: dict[str, float], seconds: float) -> None:
        self.n += 1
        self.seconds += seconds
        self.loss += loss
        for k, v in metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v


class Trainer:
    """Runs an :class:`Objective` under :class:`RunSettings`; :meth:`run` returns the weights
    file ``<out>/<method>.pt``."""

    def __init__(
        self, objective: Objective, run: RunSettings, progress: Progress | None = None
    ) -> None:
        self.objective, self.run_settings, self.progress = objective, run, progress

    def run(self) -> Path:
        """Train (or resume) and write the weights. Under torchrun, join the process group
        for the run (made here and destroyed at the end unless it already existed)."""
        device = resolve_device(self.run_settings.device)
        if launch_env() is None:
            return self._run(device, Dist())
        device = local_device(device)
        with session(device) as d:
            return self._run(device, d)

    # The run, step by step.

    def _run(self, device: torch.device, d: Dist) -> Path:
        t_setup = time.perf_counter()
        rs, obj = self.run_settings, self.objective
        amp = autocast_dtype(device, rs.precision)
        precision = str(amp[1]).replace("torch.", "") if amp[1] is not None else "fp32"
        env = RunEnv(
            rs, device, d, autocast_factory(*amp), self.progress if d.main else None, precision
        )
        obj.check(env)
        out = rs.out_dir
        ckpt_path = out / CHECKPOINT
        if ckpt_path.exists() and not rs.resume:
            raise OutputError(
                f"{out}: holds a training run ({CHECKPOINT}); pass --resume to continue it "
                "or choose another --out"
            )
        settings = obj.settings()
        ck = read_checkpoint(ckpt_path) if rs.resume and ckpt_path.exists() else None
        if ck is not None:
            if ck["method"] != obj.method:
                raise ConfigError(f"{ckpt_path}: a {ck['method']} run, not {obj.method}")
            check_resume(ckpt_path, ck["config"], settings)
        out.mkdir(parents=True, exist_ok=True)
        obj.open(env)
        eval_every = rs.eval_every or obj.eval_every

        torch.manual_seed(rs.seed)
        net = obj.build_net(dict(ck["conf"]) if ck is not None else None).to(device)
        optimizer = obj.recipe.make_optimizer(net)
        total = rs.steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: obj.recipe.factor(s, total)
        )
        scaler = torch.amp.GradScaler("cuda") if amp[1] == torch.float16 else None
        start, elapsed, rows, last_val = 0, 0.0, [], None
        if ck is not None:
            start, elapsed, last_val = self._restore(
                ck, ckpt_path, net, optimizer, scheduler, scaler, device, d
            )
            rows = [r for r in read_log(out) if r["step"] <= start]
            log.info("resuming %s at step %d", out, start)

        model = obj.train_module(net)
        if d.active:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        hardware = hardware_name(device) + (f" x {d.world_size} processes" if d.active else "")
        header = {
            "config": settings,
            "hardware": hardware,
            "precision": precision,
            "eval_every": eval_every,
        }
        columns = ("step", "loss", "lr", *obj.val_columns, "pairs_per_s", "seconds")
        columns += obj.train_columns
        log.info("setup %.1f s", time.perf_counter() - t_setup)

        def meta(step: int) -> dict[str, Any]:
            return {
                "steps": step,
                "batch_size": obj.batch_size,
                "pairs_seen": step * obj.batch_size,
                "world_size": d.world_size if d.active else 1,
                "wall_time_s": round(elapsed, 1),
                "hardware": hardware,
                "precision": precision,
                "headline": obj.headline(last_val),
                "seed": rs.seed,
                "command": rs.command,
                "descmatch_version": _version,
                "config": settings,
                **obj.meta(last_val),
            }

        def save_training(step: int) -> None:
            rng: dict[str, Any] = {"torch": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(device)
            if d.active:
                got = d.gather({"rng": rng, "digest": _weights_digest(net)})
                if len({g["digest"] for g in got}) > 1:
                    raise TrainingError(
                        f"step {step}: the weights of the {d.world_size} ranks differ "
                        "(data-parallel training went out of step)"
                    )
                rng = {**rng, "ranks": [g["rng"] for g in got]}
            if d.main:
                save_checkpoint(
                    ckpt_path,
                    net,  # type: ignore[arg-type]
                    meta(step),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict() if scaler is not None else None,
                    step=step,
                    elapsed=elapsed,
                    rng=rng,
                    config=settings,
                    objective_state=obj.state_dict(),
                    val=last_val,
                )

        def validate() -> dict[str, float] | None:
            if not d.main:
                return None
            was = net.training
            net.eval()
            try:
                return obj.validate(net)
            finally:
                net.train(was)

        net.train()
        model.train()
        step = start
        t_run = time.perf_counter()
        iv = _Interval()
        with ThreadPoolExecutor(1) as prefetch:

            def fetch(s: int) -> Future[Any] | None:
                if s >= total or obj.needs_refresh(s):
                    return None  # a refresh needs the net after the step before it
                return prefetch.submit(obj.batch, s)

            nxt = fetch(step)
            while step < total:
                t0 = time.perf_counter()  # step time includes waiting for data, not validation
                if nxt is None:
                    if obj.needs_refresh(step):
                        obj.refresh(step, net)
                        net.train()
                    nxt = prefetch.submit(obj.batch, step)
                batch = nxt.result()
                nxt = fetch(step + 1)
                ctx = StepContext(step, step_generator(rs.seed, step), device, env.autocast)
                loss, metrics = obj.loss(model, batch, ctx)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {step}: the loss is {loss.item()}; lower the learning rate "
                        f"(now {optimizer.param_groups[0]['lr']:g})"
                    )
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                keys = list(metrics)
                stacked = torch.stack([loss.detach().float(), *(metrics[k].float() for k in keys)])
                vals: list[float] = d.mean(stacked).cpu().tolist()
                step += 1
                dt = time.perf_counter() - t0
                elapsed += dt
                iv.add(vals[0], dict(zip(keys, vals[1:], strict=True)), dt)
                stop = rs.time_limit_s is not None and d.any(
                    time.perf_counter() - t_run >= rs.time_limit_s, device
                )
                is_last = step == total or stop
                val = None
                if step % eval_every == 0 or is_last:
                    val = validate()
                    last_val = val if val is not None else last_val
                if d.main and (step % rs.log_every == 0 or is_last or val is not None):
                    rows.append(_row(step, iv, optimizer, val, obj, elapsed))
                    write_logs(out, rows, header, columns)
                    iv = _Interval()
                if step % rs.checkpoint_every == 0 or is_last:
                    save_training(step)
                if env.progress:
                    env.progress(step, total, obj.progress_text(vals[0], last_val))
                if stop:
                    log.info("time limit reached at step %d", step)
                    break
            if nxt is not None:
                nxt.cancel()
        if step == start:  # nothing to do (a finished run resumed): refresh the weights' meta
            last_val = validate() or last_val
            save_training(step)
            if d.main:
                write_logs(out, rows, header, columns)
        net.eval()
        path = out / f"{obj.method}.pt"
        if d.main:
            save_checkpoint(path, net, meta(step))  # type: ignore[arg-type]
        d.barrier()
        return path

    def _restore(
        self,
        ck: dict[str, Any],
        path: Path,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LambdaLR,
        scaler: torch.amp.GradScaler | None,
        device: torch.device,
        d: Dist,
    ) -> tuple[int, float, dict[str, float] | None]:
        """Load a checkpoint's state into the run; returns (step, seconds, last validation)."""
        try:
            net.load_state_dict(ck["state_dict"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            rng_state = ck["rng"]
            ranks = rng_state.get("ranks")
            if d.active and ranks and len(ranks) == d.world_size:
                rng_state = ranks[d.rank]
            elif d.active or ranks:
                log.warning(
                    "%s: saved by %d process(es), resumed by %d: the random streams of the "
                    "ranks differ from an uninterrupted run",
                    path,
                    len(ranks) if ranks else 1,
                    d.world_size if d.active else 1,
                )
            torch.set_rng_state(rng_state["torch"])
            if device.type == "cuda" and rng_state.get("cuda") is not None:
                torch.cuda.set_rng_state(rng_state["cuda"], device)
            start = int(ck["step"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise InputError(f"{path}: does not fit this run ({first})") from None
        state = ck["objective_state"] if "objective_state" in ck else ck.get("sampler_state")
        self.objective.load_state_dict(state, ck.get("meta") or {})
        # The schedule at this step (a resumed run may have another number of steps).
        for g, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            g["lr"] = base * self.objective.recipe.factor(start, self.run_settings.steps)
        val = ck.get("val")
        return start, float(ck.get("elapsed", 0.0)), val if isinstance(val, dict) else None
