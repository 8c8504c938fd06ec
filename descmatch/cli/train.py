"""descmatch train: train a descriptor net, the keypoint frame refiner or a distilled student."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, DescmatchError
from ..patches import DEFAULT_MR_SIZE
from .app import app, progress, say, torch_device
from .options import DeviceOpt


def _given_options(ctx: typer.Context, names: tuple[str, ...]) -> set[str]:
    """The parameters among ``names`` given on the command line (not left at their default)."""
    sources = {n: getattr(ctx.get_parameter_source(n), "name", None) for n in names}
    return {n for n, s in sources.items() if s not in (None, "DEFAULT", "DEFAULT_MAP")}


def _loss_options(items: list[str]) -> dict[str, Any]:
    """``--loss-option KEY=VALUE`` items as a dict (numbers and true/false converted)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--loss-option {item!r}: expected KEY=VALUE")
        value: Any = text.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="Net to train: l2net, "
            "l2net-cs, hardnet, sosnet, sosnet-cs, student, distill (a student net "
            "distilled from --teacher, default auto: the shipped default pipeline; "
            "takes --width), or frames (the keypoint frame "
            "refiner: photos sources only; takes --steps, --batch-size, --lr, "
            "--seed, --device, --eval-every, --checkpoint-every, --resume, "
            "--time-limit, --init, --max-tilt, --pair-angle, --pair-scale, "
            "--pairs-per-image, --max-images, --frame-loss, --teacher, --rotation, "
            "--width, --mean-weight, --covariant-weight; "
            "default lr 1e-3).",
        ),
    ] = "hardnet",
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Training data, repeatable: "
            "[photos|multiview|hpatches|pool|brown:]PATH[@WEIGHT] (photos: "
            "self-supervised; multiview: scenes with cameras.txt; hpatches: "
            "sequences with images 1..N and H_1_i).",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Run folder: pools, "
            "checkpoint.pt, logs and the final <method>.pt (default "
            "runs/<method>).",
        ),
    ] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")] = 10000,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=2, help="Pairs (points) per batch (descriptor nets: the recipe's)."
        ),
    ] = 512,
    loss: Annotated[
        str | None,
        typer.Option(
            "--loss",
            help="l2net, hardnet, sosnet, contrastive, triplet (default: the method's own).",
        ),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            help="Training recipe: default (the project's, chosen by measurement) or paper "
            "(the method's paper: sampler, batch size, optimiser, schedule, dropout, "
            "augmentation, forward passes). Options given explicitly override it.",
        ),
    ] = "default",
    loss_option: Annotated[
        list[str] | None,
        typer.Option(
            "--loss-option",
            help="KEY=VALUE option of the loss, repeatable (e.g. e3=cosine, e2=none, "
            "reduction=sum for l2net; form=hadsell for contrastive; margin=0.5).",
        ),
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help="sgd or adam (default: the method's own).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr", help="Learning rate (default: the method's own), decayed linearly to 0."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision", help="auto (bf16 where the CPU has it, AMP on CUDA), bf16, fp16, fp32."
        ),
    ] = "auto",
    val: Annotated[
        str | None,
        typer.Option(
            "--val",
            help="Validation: brown:PATH, pool:PATH, "
            "none (default: 5% of the first source's photos held out).",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            "--eval-every", help="Steps between validation FPR95 (default: once per epoch)."
        ),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 500,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out exactly where it stopped.")
    ] = False,
    time_limit: Annotated[
        float | None,
        typer.Option(
            "--time-limit",
            help="Stop cleanly after this many seconds (checkpoint and weights written).",
        ),
    ] = None,
    mr_size: Annotated[
        float,
        typer.Option(
            "--mr-size", help="Patch window of the training patches, recorded in the weights."
        ),
    ] = DEFAULT_MR_SIZE,
    pairs_per_image: Annotated[int, typer.Option("--pairs-per-image")] = 512,
    max_images: Annotated[
        int | None, typer.Option("--max-images", help="Use at most this many photos per source.")
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes generating training pairs.")
    ] = 1,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="Batch composition: same-image "
            "(few photos x many points), random (HardNet: uniform over the pool), "
            "progressive (L2-Net), hard-negative (points close in descriptor "
            "space, mined with the current net). Default: the recipe's.",
        ),
    ] = "same-image",
    p1_fraction: Annotated[
        float,
        typer.Option(
            "--p1-fraction",
            min=0.0,
            max=1.0,
            help="progressive: share of a batch walking the shuffled sequence "
            "(default: the recipe's).",
        ),
    ] = 0.5,
    mine_every: Annotated[
        int,
        typer.Option(
            "--mine-every", min=1, help="hard-negative: steps between descriptor updates."
        ),
    ] = 1000,
    mine_points: Annotated[
        int,
        typer.Option(
            "--mine-points",
            min=2,
            help="hard-negative: random points per source described at each update.",
        ),
    ] = 32768,
    mine_group: Annotated[
        int,
        typer.Option(
            "--mine-group",
            min=0,
            help="hard-negative: points per group of neighbours (0: the whole batch).",
        ),
    ] = 64,
    init: Annotated[
        str | None,
        typer.Option(
            "--init",
            help="Start from these weights (a "
            "file or shipped name of the same method) instead of random ones: "
            "fine-tuning.",
        ),
    ] = None,
    max_tilt: Annotated[
        float,
        typer.Option(
            "--max-tilt",
            min=1.0,
            help="Photo sources: add "
            "random camera tilts (affine foreshortening) up to this factor to the "
            "homographies (1 = none).",
        ),
    ] = 1.0,
    pair_angle: Annotated[
        float,
        typer.Option(
            "--pair-angle",
            help="Photo and HPatches "
            "sources: a detected keypoint pairs with a mapped one whose "
            "orientation is at most this many degrees away.",
        ),
    ] = 30.0,
    pair_scale: Annotated[
        float,
        typer.Option(
            "--pair-scale",
            help="Photo and HPatches "
            "sources: the largest ratio between the sizes of a detected and a "
            "mapped keypoint that pair.",
        ),
    ] = 1.2,
    frames: Annotated[
        str | None,
        typer.Option(
            "--frames",
            help="Descriptor nets: cut the "
            "photo and multiview training patches in the refined frames of this "
            "frame net (a file or shipped name, e.g. frames), as --frames cuts "
            "them at inference. distill: the student's own refiner, written beside "
            "it and used wherever the student describes.",
        ),
    ] = None,
    frame_loss: Annotated[
        str,
        typer.Option(
            "--frame-loss",
            help="--method frames: "
            "covariant (refined frames of each pair map onto each other) or "
            "descriptor (the hardest-in-batch loss of a frozen --teacher "
            "descriptor on patches cut in the refined frames, negatives held "
            "constant).",
        ),
    ] = "covariant",
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="--frame-loss descriptor: "
            "the frozen descriptor net (a file or shipped name, e.g. "
            "sosnet-cs); --method distill: the pipeline to distil (auto: the "
            "shipped default with its frame refiner and size pooling).",
        ),
    ] = None,
    rotation: Annotated[
        bool,
        typer.Option(
            "--rotation",
            help="--method frames: learn a rotation of the frame too (default: scale only).",
        ),
    ] = False,
    stem: Annotated[
        str,
        typer.Option(
            "--stem",
            help="--method distill: how the student's streams start: conv (a 3x3 "
            "convolution at full resolution) or unshuffle (the patch folded 2x2 into 4 "
            "channels first: no full-resolution convolution, faster on the CPU).",
        ),
    ] = "conv",
    views: Annotated[
        int,
        typer.Option(
            "--views",
            help="--method distill: what the student sees: 2 (one 64-px central-surround "
            "patch) or 3 (three 32-px patches over 1, 2 and 4 keypoint windows; with "
            "--mr-size 7 they span 0.7x to 2.8x the default's window).",
        ),
    ] = 2,
    width: Annotated[
        int | None,
        typer.Option(
            "--width",
            min=1,
            help="--method frames: "
            "channels of the frame net's first layers (default 16; the net's cost "
            "grows with its square).",
        ),
    ] = None,
    covariant_weight: Annotated[
        float,
        typer.Option(
            "--covariant-weight",
            min=0.0,
            help="--frame-loss descriptor: add the covariant loss with this weight.",
        ),
    ] = 0.0,
    mean_weight: Annotated[
        float,
        typer.Option(
            "--mean-weight",
            min=0.0,
            help="--method "
            "frames: weight of the penalty on the batch's mean rotation and "
            "log scale (keeps the refinement free of one global turn or "
            "rescaling).",
        ),
    ] = 1.0,
    teacher_size_pool: Annotated[
        str,
        typer.Option(
            "--teacher-size-pool",
            help="--frame-loss "
            "descriptor: the teacher's descriptors size-pooled over "
            "these factors, as --size-pool describes (none: one "
            "patch).",
        ),
    ] = "none",
) -> None:
    """Train a descriptor net (L2-Net, HardNet, SOSNet objectives) with checkpoints and
    validation FPR95; writes <out>/<method>.pt, loadable with --weights.

    Data-parallel in several processes (DistributedDataParallel; gloo on the CPU,
    NCCL on CUDA with one GPU per process, cuda:LOCAL_RANK):

      torchrun --nproc_per_node 2 -m descmatch train --data ... --out ...

    --batch-size is the global batch: each process trains on its share of it.
    Rank 0 alone builds pools, validates, logs and writes; --resume is exact
    with the same number of processes."""

    from ..train.descriptors import TrainConfig, train

    if not data:
        raise DescmatchError("--data is required (e.g. --data photos:PATH/TO/photos)")
    # What every training run takes, whatever it trains.
    run: dict[str, Any] = {
        "data": list(data),
        "out_dir": out_dir or Path("runs") / method,
        "steps": steps,
        "seed": seed,
        "device": str(torch_device(device)),
        "checkpoint_every": checkpoint_every,
        "resume": resume,
        "time_limit_s": time_limit,
        "command": "descmatch " + " ".join(sys.argv[1:]),
    }
    if method in ("frames", "distill") and (recipe != "default" or loss_option):
        raise DescmatchError("--recipe and --loss-option apply to the descriptor nets")
    if method != "distill" and (stem != "conv" or views != 2):
        raise DescmatchError("--stem and --views apply to --method distill")
    if method == "distill":
        from ..train.distill import DistillConfig, train_distill

        dcfg = DistillConfig(
            **run,
            teacher=teacher or "auto",
            net_conf={**({"width": width} if width else {}), "stem": stem, "views": views},
            batch_size=batch_size,
            lr=lr or 1e-3,
            precision=precision,
            eval_every=eval_every,
            mr_size=mr_size,
            pairs_per_image=pairs_per_image,
            max_images=max_images,
            max_tilt=max_tilt,
            pair_angle=pair_angle,
            pair_scale=pair_scale,
            frames=frames,
        )
        with progress("train distill") as cb:
            path = train_distill(dcfg, progress=cb)
        say(f"wrote {path}")
        return
    if method != "frames" and (
        frame_loss != "covariant"
        or teacher is not None
        or rotation
        or mean_weight != 1.0
        or covariant_weight
        or width
        or teacher_size_pool != "none"
    ):
        raise DescmatchError(
            "--frame-loss, --teacher, --rotation, --width, --mean-weight, "
            "--covariant-weight and --teacher-size-pool apply to --method "
            "frames"
        )
    if method == "frames":
        from ..describe import resolve_size_pool
        from ..train.frames import FramesConfig, train_frames

        if frames is not None:
            raise DescmatchError("--frames applies to descriptor nets, not to --method frames")
        fcfg = FramesConfig(
            **run,
            batch_size=batch_size,
            lr=lr or 1e-3,
            max_tilt=max_tilt,
            pair_angle=pair_angle,
            pair_scale=pair_scale,
            pairs_per_image=pairs_per_image,
            max_images=max_images,
            eval_every=eval_every or 500,
            init=init,
            objective=frame_loss,
            teacher=teacher,
            net_conf={
                **({"rotation": True} if rotation else {}),
                **({"width": width} if width else {}),
            },
            mean_weight=mean_weight,
            covariant_weight=covariant_weight,
            teacher_size_pool=resolve_size_pool(teacher_size_pool),
            precision="fp32" if precision == "auto" else precision,
        )
        with progress("train frames") as cb:
            path = train_frames(fcfg, progress=cb)
        say(f"wrote {path}")
        return
    given = _given_options(ctx, ("batch_size", "sampler", "p1_fraction"))
    cfg = TrainConfig(
        **run,
        method=method,
        recipe=recipe,
        batch_size=batch_size if "batch_size" in given else None,
        loss=loss,
        loss_options=_loss_options(loss_option or []),
        optimizer=optimizer,
        lr=lr,
        precision=precision,
        val=val,
        eval_every=eval_every,
        mr_size=mr_size,
        pairs_per_image=pairs_per_image,
        max_images=max_images,
        pool_workers=workers,
        sampler=sampler if "sampler" in given else None,
        p1_fraction=p1_fraction if "p1_fraction" in given else None,
        mine_every=mine_every,
        mine_points=mine_points,
        mine_group=mine_group or None,
        init=init,
        max_tilt=max_tilt,
        pair_max_angle=pair_angle,
        pair_max_scale=pair_scale,
        frames=frames,
    )
    with progress(f"train {method}") as cb:
        path = train(cfg, progress=cb)
    say(f"wrote {path}")
