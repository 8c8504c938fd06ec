"""Nets: registry, shapes, per-patch normalisation inside the model, config checks, BN folding."""

from __future__ import annotations

import pytest
import torch

from descmatch.describe import resolve_precision
from descmatch.errors import ConfigError
from descmatch.nets import NETS, build_net, init_central_surround
from descmatch.nets.fold import fold_batchnorm


@pytest.mark.parametrize("name", list(NETS))
def test_shapes_and_unit_norm(name: str) -> None:
    net = build_net(name).eval()
    x = torch.rand(6, 1, net.patch_size, net.patch_size)
    with torch.inference_mode():
        y = net(x)
    assert y.shape == (6, net.dim)
    assert torch.allclose(y.norm(dim=1), torch.ones(6), atol=1e-5)


@pytest.mark.parametrize("name", list(NETS))
def test_input_normalisation_is_inside_the_model(name: str) -> None:
    """Brightness and contrast changes of a patch do not change its descriptor."""
    torch.manual_seed(0)
    net = build_net(name).eval()
    x = torch.rand(4, 1, net.patch_size, net.patch_size) * 0.5
    with torch.inference_mode():
        assert torch.allclose(net(x), net(x * 1.7 + 0.2), atol=1e-4)


def test_unknown_config_key_lists_valid_ones() -> None:
    with pytest.raises(ConfigError, match="valid keys: dim, dropout"):
        build_net("hardnet", {"dims": 64})
    with pytest.raises(ConfigError, match="choose one of"):
        build_net("nope")


def test_l2net_tower_cost() -> None:
    """The shared L2-Net tower: 7 convolutions, about 39 M multiply-adds per 32x32 patch."""
    net = build_net("l2net")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 7
    sizes = [32, 32, 16, 16, 8, 8, 1]
    macs = sum(c.weight.numel() * s * s for c, s in zip(convs, sizes, strict=True))
    assert 38e6 < macs < 40e6


@pytest.mark.parametrize(("cs", "plain"), [("l2net-cs", "l2net"), ("sosnet-cs", "sosnet")])
def test_central_surround_starts_from_its_plain_net(cs: str, plain: str) -> None:
    """Both towers take the plain net's weights: the centre half is the plain descriptor of
    the central 32x32 crop, the surround half that of the whole patch at half resolution."""
    torch.manual_seed(2)
    base = build_net(plain).train()
    with torch.no_grad():  # running statistics that differ from a fresh net's
        for _ in range(3):
            base(torch.rand(64, 1, 32, 32) * 2 + 0.5)
    base.eval()
    net = build_net(cs)
    init_central_surround(net, base)  # type: ignore[arg-type]
    net.eval()
    x = torch.rand(5, 1, 64, 64)
    with torch.inference_mode():
        y = net(x) * 2**0.5
        assert torch.allclose(y[:, :128], base(x[:, :, 16:48, 16:48]), atol=1e-5)
        assert torch.allclose(y[:, 128:], base(torch.nn.functional.avg_pool2d(x, 2)), atol=1e-5)
    other = "sosnet" if plain == "l2net" else "l2net"
    with pytest.raises(ConfigError, match=f"starts from {plain} weights, not {other}"):
        init_central_surround(net, build_net(other))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cannot start from a 64-D"):
        init_central_surround(net, build_net(plain, {"dim": 64}))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(NETS))
def test_fold_batchnorm_is_the_same_function(name: str) -> None:
    torch.manual_seed(1)
    net = build_net(name)
    net.train()
    with torch.no_grad():  # give batch norm non-trivial running statistics
        for _ in range(3):
            net(torch.rand(64, 1, net.patch_size, net.patch_size))
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(32, 1, net.patch_size, net.patch_size)
    with torch.inference_mode():
        assert torch.allclose(net(x), folded(x), atol=1e-5)


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) in ("fp32", "bf16")
    with pytest.raises(ConfigError):
        resolve_precision("fp16", cpu)
    assert resolve_precision("int8", cpu) == "int8"  # the CPU's ONNX Runtime path
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_precision("int8", torch.device("cuda"))
    with pytest.raises(ConfigError):
        resolve_precision("int4", cpu)
