"""The weights that ship in weights/: each loads strictly into its net, carries its training
record, is documented in weights/README.md with its sha256, and makes real descriptors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.examples import render_scene
from descmatch.weights import default_method, list_weights, load_net, weights_dir

REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
SHIPPED = sorted(REPO_WEIGHTS.glob("*.pt"))


@pytest.fixture(autouse=True)
def shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DESCMATCH_WEIGHTS", str(REPO_WEIGHTS))


def test_default_names_a_shipped_file() -> None:
    default = REPO_WEIGHTS / "DEFAULT"
    if default.exists():
        name = default.read_text().strip()
        assert (REPO_WEIGHTS / f"{name}.pt").is_file()
        assert default_method() == name
    else:
        assert default_method() is None


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_weights_are_real_and_documented(path: Path) -> None:
    assert weights_dir() == REPO_WEIGHTS
    info = {w.name: w for w in list_weights()}[path.stem]
    readme = (REPO_WEIGHTS / "README.md").read_text()
    assert path.name in readme and info.sha256 in readme
    loaded = load_net(info.net, path)
    for key in ("command", "data", "steps", "mr_size"):
        assert key in loaded.meta, key
    assert "dev" not in str(loaded.meta["data"]).split("/")  # never trained on shared/data/dev
    # Trained, not initial: batch norm statistics have moved away from (0, 1).
    bn = [m for m in loaded.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert any(float(m.running_var.mean()) != 1.0 for m in bn)
    img = render_scene(320, 240, seed=5).astype(np.float32) / 255.0
    kps = SiftDetector(max_keypoints=100)(img)
    if info.net == "frames":  # the keypoint frame refiner that learned nets use by default
        describer = build_describer("auto", precision="fp32")
        assert describer.meta["frames_sha256"] == info.sha256
        ratio = describer.refine(img, kps).size / kps.size  # type: ignore[attr-defined]
        assert np.all(ratio < 1.8) and np.all(ratio > 1 / 1.8) and np.ptp(ratio) > 0.05
        return
    d = build_describer(info.net, weights=str(path), precision="fp32")(img, kps)
    assert d.shape == (len(kps), loaded.net.dim)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)


def test_listing_names_data_sets_not_machine_paths() -> None:
    from descmatch.weights import data_label

    for info in list_weights():
        assert "../" not in info.data and "/work/" not in info.data, info.data
    assert data_label("photos:../a/data/photos@2 (5 points); multiview:/x/data/mv/c1@0.5") == (
        "photos:photos@2 (5 points); multiview:mv/c1@0.5"
    )
    assert data_label("photos:/home/me/pics") == "photos:pics"
