"""``descmatch weights import``: published HardNet and SOSNet weight files (the authors'
layouts and kornia's modules) into descmatch checkpoints that compute the same descriptors
as kornia's forward, refused cleanly when they do not fit, and usable with --weights."""

from __future__ import annotations

from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from descmatch.errors import OutputError, WeightsError
from descmatch.h5 import Reader
from descmatch.nets import build_net
from descmatch.safe_load import load_torch_file
from descmatch.weights import load_net, sha256
from descmatch.weights_import import descmatch_to_foreign, import_weights

KF = pytest.importorskip("kornia.feature")

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    """A kornia module (never pretrained: that downloads) with random weights and batch-norm
    statistics, in eval mode, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.2)
            elif isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, nn.Module]]:
    """Weight files as users bring them, and the kornia module each came from: kornia's
    HardNet and SOSNet state dicts, HardNet's official layout ({"state_dict": ...}) and
    SOSNet's (a bare state dict, as kornia's)."""
    d = tmp_path_factory.mktemp("published")
    hard = _randomised(KF.HardNet(pretrained=False), 1)
    sos = _randomised(KF.SOSNet(pretrained=False), 2)
    torch.save(hard.state_dict(), d / "kornia_hardnet.pth")
    torch.save({"epoch": 9, "state_dict": hard.state_dict()}, d / "checkpoint_liberty_with_aug.pth")
    torch.save(sos.state_dict(), d / "sosnet_32x32_liberty.pth")
    return {
        "hardnet-kornia": (d / "kornia_hardnet.pth", hard),
        "hardnet-official": (d / "checkpoint_liberty_with_aug.pth", hard),
        "sosnet-official": (d / "sosnet_32x32_liberty.pth", sos),
    }


@pytest.mark.parametrize("which", ["hardnet-kornia", "hardnet-official", "sosnet-official"])
def test_import_gives_kornias_descriptors(
    published: dict[str, tuple[Path, nn.Module]], tmp_path: Path, which: str
) -> None:
    src, kornia_net = published[which]
    net_name = which.split("-")[0]
    out = import_weights(src, net_name, tmp_path / "imported.pt")
    ckpt = load_torch_file(out)
    assert ckpt["format"] == "descmatch" and ckpt["method"] == net_name
    assert ckpt["meta"]["source"] == src.name and ckpt["meta"]["source_sha256"] == sha256(src)
    loaded = load_net(net_name, out)
    patches = torch.rand(256, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    patches[:8] *= 0.05  # low-contrast patches too
    with torch.inference_mode():
        ours, theirs = loaded.net(patches), kornia_net(patches)
    assert ours.shape == theirs.shape == (256, 128)
    assert (ours - theirs).abs().max().item() < 1e-5
    # Not a trivially small difference: another net's descriptors differ by far more.
    with torch.inference_mode():
        other = build_net(net_name).eval()(patches)
    assert (other - theirs).abs().max().item() > 0.1


def test_descmatch_weights_into_kornia(published: dict[str, tuple[Path, nn.Module]]) -> None:
    """The other way: a descmatch net's tensors into kornia's module give its descriptors."""
    torch.manual_seed(3)
    ours = build_net("sosnet").eval()
    k = KF.SOSNet(pretrained=False)
    k.load_state_dict(descmatch_to_foreign(ours, k.state_dict()), strict=True)
    x = torch.rand(64, 1, 32, 32)
    with torch.inference_mode():
        assert (k.eval()(x) - ours(x)).abs().max().item() < 1e-5


def test_files_that_do_not_fit_are_refused(
    published: dict[str, tuple[Path, nn.Module]], tmp_path: Path
) -> None:
    hard_src, _ = published["hardnet-kornia"]
    with pytest.raises(WeightsError, match="not in the SOSNet .* layout"):
        import_weights(hard_src, "sosnet", tmp_path / "x.pt")
    torch.save(KF.HardNet8(pretrained=False).state_dict(), tmp_path / "hardnet8.pth")
    with pytest.raises(WeightsError, match="hardnet8.pth"):
        import_weights(tmp_path / "hardnet8.pth", "hardnet", tmp_path / "x.pt")
    with pytest.raises(WeightsError, match="no published layout.*hardnet, sosnet"):
        import_weights(hard_src, "l2net", tmp_path / "x.pt")
    # A file that would build Python objects (here the training script's arguments, as
    # some checkpoints hold) is never unpickled: one line, nothing written.
    torch.save(
        {"state_dict": published["hardnet-kornia"][1].state_dict(), "args": Namespace(lr=0.1)},
        tmp_path / "evil.pth",
    )
    with pytest.raises(WeightsError, match="evil.pth") as e:
        import_weights(tmp_path / "evil.pth", "hardnet", tmp_path / "x.pt")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.pt").exists()
    out = import_weights(hard_src, "hardnet", tmp_path / "x.pt")
    with pytest.raises(OutputError, match="--overwrite"):
        import_weights(hard_src, "hardnet", out)
    with pytest.raises(WeightsError, match="descmatch checkpoint already"):
        import_weights(out, "hardnet", tmp_path / "y.pt", overwrite=True)


def test_import_command_then_extract_with_it(
    published: dict[str, tuple[Path, nn.Module]],
    example_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    call_main: Callable[..., tuple[int, str, str]],
) -> None:
    src, kornia_net = published["hardnet-official"]
    monkeypatch.chdir(tmp_path)
    code, out, err = call_main("weights", "import", str(src), "--net", "hardnet")
    assert code == 0, err
    ckpt = Path("weights") / "hardnet-checkpoint_liberty_with_aug.pt"
    assert ckpt.is_file() and str(ckpt) in out
    code, out, err = call_main("weights", "import", str(src), "--net", "hardnet")
    assert code == OutputError.exit_code and "--overwrite" in err
    code, out, err = call_main("weights", "import", str(src), "--net", "sosnet", "--out", "s.pt")
    assert code == WeightsError.exit_code and len(err.strip().splitlines()) == 1
    code, out, err = call_main("weights")  # bare: still the listing
    assert code == 0 and "no trained weights" in out

    feats = tmp_path / "f.h5"
    args = ["extract", str(example_dir / "view1.jpg"), str(feats), "-m", "hardnet"]
    code, out, err = call_main(
        *args, "--weights", str(ckpt), "--max-keypoints", "50", "--size-pool", "none"
    )
    assert code == 0, err
    with Reader(feats, "features") as r:
        assert r.attrs["weights"] == ckpt.name
        d = r.read("view1.jpg")["descriptors"]
    assert d.shape == (128, 50)
    np.testing.assert_allclose(np.linalg.norm(d, axis=0), 1.0, atol=1e-4)
