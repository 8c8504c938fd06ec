"""Make the int8 models of a learned describer: its descriptor net and its frame refiner,
each calibrated on the patches the pipeline cuts for it from training images.

    python -m descmatch.quantize --method sosnet-cs --images TRAINING_PHOTOS

writes ``<weights>.int8.onnx`` beside each weights file (``--out-dir`` elsewhere). The
descriptor net is calibrated on the patches it describes in use: the detector's keypoints,
the refiner's frames and every size-pooling factor; the refiner on its own input, patches in
the detector's frames. Calibrate on training images, never on the images you evaluate on.
Needs ``onnxruntime`` and ``onnx``.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import torch

from .describe import NetDescriber, build_describer, resolve_frames
from .detect import build_detector
from .images import list_images, read_image, resize_max
from .int8 import int8_path, quantize_net
from .nets import FrameNet
from .patches import extract_patches
from .weights import load_net

log = logging.getLogger(__name__)


def calibration_patches(
    describer: NetDescriber,
    images: list[Path],
    keypoints: int = 500,
    max_side: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The describer's net input and its refiner's input (None without a refiner) over
    ``images``: up to ``keypoints`` of the detector's strongest keypoints per image (images
    resized to at most ``max_side`` pixels). Shape: -> (M,1,P,P), (K,1,32,32)."""
    detector = build_detector("sift", max_keypoints=keypoints)
    nets, frames = [], []
    for path in images:
        image, _ = resize_max(read_image(path), max_side)
        kps = detector(image)
        if len(kps) == 0:
            continue
        if describer.frames is not None:
            frames.append(
                extract_patches(
                    torch.from_numpy(image),
                    kps.xy,
                    kps.size,
                    kps.angle,
                    patch_size=FrameNet.patch_size,
                    mr_size=describer.frames_mr_size,
                )
            )
        nets.append(describer.patches(image, describer.refine(image, kps)))
    return torch.cat(nets), (torch.cat(frames) if frames else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m descmatch.quantize", description=__doc__)
    p.add_argument("--method", required=True, help="learned net, e.g. sosnet-cs")
    p.add_argument("--weights", default=None, help="weights file or shipped name")
    p.add_argument("--frames", default="auto", help="frame refiner (auto, none, file)")
    p.add_argument("--size-pool", default="auto", help="size pooling, as extract's option")
    p.add_argument("--images", required=True, help="training images (folder, glob, list)")
    p.add_argument("--count", type=int, default=40, help="images drawn at random")
    p.add_argument("--keypoints", type=int, default=500, help="keypoints per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=None, help="default: beside the weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    describer = build_describer(
        args.method,
        args.weights,
        precision="fp32",
        frames=args.frames,
        size_pool=args.size_pool,
    )
    assert isinstance(describer, NetDescriber)
    listed = list_images(args.images)
    names = sorted(listed.names)
    random.Random(args.seed).shuffle(names)
    chosen = [listed.path(n) for n in names[: args.count]]
    nets, frames = calibration_patches(describer, chosen, args.keypoints)
    log.info("calibration: %d images, %d net patches", len(chosen), len(nets))

    def target(path: Path) -> Path:
        out = int8_path(path)
        return args.out_dir / out.name if args.out_dir else out

    loaded = load_net(args.method, args.weights)
    quantize_net(loaded.net, nets, target(loaded.path), loaded.sha256)
    frames_name = resolve_frames(args.frames)
    if frames is not None and frames_name is not None:
        refiner = load_net("frames", frames_name)
        quantize_net(refiner.net, frames, target(refiner.path), refiner.sha256)


if __name__ == "__main__":
    main()
