"""int8 inference through ONNX Runtime: the quantised models agree with the float32 nets,
know which weights they belong to, and plug into the describer behind ``--precision int8``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from descmatch import describe
from descmatch.describe import NetDescriber, build_describer, resolve_precision
from descmatch.detect import SiftDetector
from descmatch.errors import ConfigError, WeightsError
from descmatch.examples import render_scene
from descmatch.nets import build_net
from descmatch.patches import extract_patches
from descmatch.weights import save_checkpoint, sha256

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from descmatch.int8 import Int8Net, int8_path, quantize_net  # noqa: E402
from descmatch.quantize import main as quantize_main  # noqa: E402

REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def scene_patches(patch_size: int, n: int = 384, seed: int = 3) -> torch.Tensor:
    """Patches at SIFT keypoints of a rendered scene. Shape: -> (n,1,P,P)."""
    img = render_scene(320, 240, seed=seed).astype(np.float32) / 255.0
    kps = SiftDetector(max_keypoints=n)(img)
    return extract_patches(
        torch.from_numpy(img), kps.xy, kps.size, kps.angle, patch_size=patch_size
    )[:n]


@pytest.fixture(scope="module")
def sosnet_int8(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    net = build_net("sosnet").eval()
    out = tmp_path_factory.mktemp("int8") / "sos.int8.onnx"
    quantize_net(net, scene_patches(32, seed=4), out, "ab" * 32)
    return net, out


def test_int8_descriptors_agree_with_fp32(sosnet_int8: tuple[torch.nn.Module, Path]) -> None:
    net, path = sosnet_int8
    x = scene_patches(32, n=200, seed=5)  # not the calibration scene
    with torch.inference_mode():
        ref = net(x)
    got = Int8Net(path, 32, "ab" * 32)(x)
    assert got.shape == ref.shape == (len(x), 128) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(x)), atol=1e-4, rtol=0)
    cos = (got * ref).sum(1)
    assert cos.mean() > 0.98 and cos.min() > 0.9
    # Not the identity of a float model: int8 rounding shows.
    assert (got - ref).abs().max() > 1e-5


def test_int8_model_names_its_weights(sosnet_int8: tuple[torch.nn.Module, Path]) -> None:
    _, path = sosnet_int8
    assert Int8Net(path, 32).source_sha256 == "ab" * 32
    with pytest.raises(WeightsError, match="int8 model of other weights"):
        Int8Net(path, 32, "cd" * 32)


def test_int8_refuses_missing_and_broken_models(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no int8 model"):
        Int8Net(tmp_path / "none.int8.onnx", 32)
    bad = tmp_path / "bad.int8.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(WeightsError, match="bad.int8.onnx: not a readable ONNX model"):
        Int8Net(bad, 32)


def test_int8_precision_is_cpu_only_and_needs_a_model() -> None:
    assert resolve_precision("int8", torch.device("cpu")) == "int8"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ConfigError, match="no int8 model given"):
        NetDescriber(build_net("sosnet"), torch.device("cpu"), precision="int8")
    assert int8_path(Path("w/sosnet-cs.pt")) == Path("w/sosnet-cs.int8.onnx")


def test_quantize_then_describe_in_int8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``python -m descmatch.quantize`` calibrates a central-surround net and a frame refiner
    on training images; ``--precision int8`` then describes like fp32 and refines alike."""
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setenv("DESCMATCH_WEIGHTS", str(weights))
    torch.manual_seed(1)
    save_checkpoint(weights / "sosnet-cs.pt", build_net("sosnet-cs"), meta={})
    frames = build_net("frames", {"rotation": True})
    torch.nn.init.normal_(frames.head.weight, std=0.02)  # an untrained head keeps the frames
    save_checkpoint(weights / "frames.pt", frames, meta={})
    train = tmp_path / "train"
    train.mkdir()
    for i in range(3):
        import cv2

        assert cv2.imwrite(str(train / f"t{i}.png"), render_scene(256, 192, seed=20 + i))
    quantize_main(
        ["--method", "sosnet-cs", "--images", str(train), "--count", "3", "--keypoints", "150"]
    )
    assert (weights / "sosnet-cs.int8.onnx").is_file() and (weights / "frames.int8.onnx").is_file()

    img = render_scene(320, 240, seed=30).astype(np.float32) / 255.0
    kps = SiftDetector(max_keypoints=200)(img)
    fp32 = build_describer("sosnet-cs", precision="fp32")
    int8 = build_describer("sosnet-cs", precision="int8")
    assert isinstance(fp32, NetDescriber) and isinstance(int8, NetDescriber)
    assert int8.meta["int8"] == "sosnet-cs.int8.onnx"
    assert int8.meta["frames_int8"] == "frames.int8.onnx"
    r32, r8 = fp32.refine(img, kps), int8.refine(img, kps)
    assert np.abs(np.log(r8.size / r32.size)).max() < 0.05
    assert not np.array_equal(r32.size, kps.size)  # the refiner did move the frames
    d32, d8 = fp32.describe(img, r32), int8.describe(img, r32)
    assert d8.shape == d32.shape == (len(kps), 256)
    assert (d8 * d32).sum(1).mean() > 0.98

    # auto: int8 where the CPU has int8 dot products and both models are there.
    monkeypatch.setattr(describe, "cpu_has_int8_dot", lambda: True)
    assert build_describer("sosnet-cs").precision == "int8"  # type: ignore[attr-defined]
    monkeypatch.setattr(describe, "cpu_has_int8_dot", lambda: False)
    assert build_describer("sosnet-cs").precision != "int8"  # type: ignore[attr-defined]
    monkeypatch.setattr(describe, "cpu_has_int8_dot", lambda: True)
    no_refiner = build_describer("sosnet-cs", frames="none")
    assert no_refiner.precision == "int8" and "frames_int8" not in no_refiner.meta  # type: ignore[attr-defined]

    # Weights trained again: the old int8 model no longer fits them; auto says so and
    # falls back, an explicit int8 is an error.
    torch.manual_seed(2)
    save_checkpoint(weights / "sosnet-cs.pt", build_net("sosnet-cs"), meta={})
    with pytest.raises(WeightsError, match="int8 model of other weights"):
        build_describer("sosnet-cs", precision="int8")
    with caplog.at_level(logging.WARNING, logger="descmatch.describe"):
        assert build_describer("sosnet-cs").precision != "int8"  # type: ignore[attr-defined]
    assert "int8 model of other weights" in caplog.text


@pytest.mark.parametrize("path", sorted(REPO_WEIGHTS.glob("*.int8.onnx")), ids=lambda p: p.name)
def test_shipped_int8_models_belong_to_shipped_weights(path: Path) -> None:
    weights = path.with_name(path.name.removesuffix(".int8.onnx") + ".pt")
    assert weights.is_file(), f"{path.name} ships without {weights.name}"
    assert Int8Net(path, 32).source_sha256 == sha256(weights)
