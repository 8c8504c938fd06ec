"""Central-surround nets: the paper's two unit halves for training, unit-length descriptors
for inference, and shipped weights giving the same matches either way."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from descmatch.errors import ConfigError
from descmatch.match import match_descriptors
from descmatch.nets import build_net
from descmatch.weights import load_net


def _patches(n: int, seed: int) -> torch.Tensor:
    """Smooth random 64x64 patches in [0, 1]. Shape: (n,1,64,64)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 16, 16, generator=g)
    return F.interpolate(x, size=64, mode="bicubic", align_corners=False).clamp(0, 1)


def _old_forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The former inference formula: the two unit halves concatenated and renormalised."""
    c, s = x[:, :, 16:48, 16:48], F.avg_pool2d(x, kernel_size=2)
    oc, _ = net.center(net.normalize_input(c))
    os_, _ = net.surround(net.normalize_input(s))
    out = torch.cat([F.normalize(oc, dim=1, eps=1e-10), F.normalize(os_, dim=1, eps=1e-10)], 1)
    return F.normalize(out, dim=1, eps=1e-10)


@pytest.mark.parametrize("name", ["l2net-cs", "sosnet-cs"])
def test_training_form_is_two_unit_halves_inference_is_unit(name: str) -> None:
    torch.manual_seed(0)
    x = _patches(6, 1)
    halves = build_net(name).eval()
    assert halves.conf["concat_norm"] == "halves"
    unit = copy.deepcopy(halves)  # the same weights with the other training form
    unit.conf = {**halves.conf, "concat_norm": "unit"}
    with torch.no_grad():
        train_h = halves.forward_features(x)[0]
        train_u = unit.forward_features(x)[0]
        infer_h, infer_u = halves(x), unit(x)
    half = halves.dim // 2
    torch.testing.assert_close(train_h[:, :half].norm(dim=1), torch.ones(6))
    torch.testing.assert_close(train_h[:, half:].norm(dim=1), torch.ones(6))
    torch.testing.assert_close(train_h.norm(dim=1), torch.full((6,), math.sqrt(2)))
    torch.testing.assert_close(train_u, train_h / math.sqrt(2))
    # Inference is the unit-length concatenation whatever concat_norm says, bit for bit the
    # former formula.
    assert torch.equal(infer_h, infer_u)
    assert torch.equal(infer_h, _old_forward(halves, x))
    assert torch.equal(
        infer_h, halves.forward_streams(x[:, :, 16:48, 16:48], F.avg_pool2d(x, 2))[0]
    )
    with pytest.raises(ConfigError, match="halves"):
        build_net(name, {"concat_norm": "sqrt2"})


SHIPPED_SOSNET_CS = Path(__file__).resolve().parent.parent / "weights" / "sosnet-cs.pt"


@pytest.mark.skipif(not SHIPPED_SOSNET_CS.is_file(), reason="sosnet-cs.pt does not ship")
def test_shipped_sosnet_cs_same_descriptors_and_same_matches() -> None:
    net = load_net("sosnet-cs", SHIPPED_SOSNET_CS).net
    x0, x1 = _patches(64, 2), _patches(64, 3)
    # Make half of the second set near copies of the first, so there are real matches.
    noise = torch.randn(32, 1, 64, 64, generator=torch.Generator().manual_seed(4))
    x1[:32] = (x0[:32] + 0.03 * noise).clamp(0, 1)
    with torch.no_grad():
        d0, d1 = net(x0), net(x1)
        assert torch.equal(d0, _old_forward(net, x0))  # shipped inference unchanged
        h0, h1 = net.forward_features(x0)[0], net.forward_features(x1)[0]
    torch.testing.assert_close(h0.norm(dim=1), torch.full((64,), math.sqrt(2)))
    # Two unit halves scale every distance by sqrt 2: nearest neighbours, the mutual check and
    # the ratio test decide the same.
    for ratio in (None, 0.8, 0.95):
        m_unit, _ = match_descriptors(d0, d1, ratio=ratio, precision="fp32")
        m_half, _ = match_descriptors(h0, h1, ratio=ratio, precision="fp32")
        assert torch.equal(m_unit, m_half), ratio
        assert (m_unit >= 0).sum() >= 24
