"""Domain-size pooling (``--size-pool``): the pooled descriptor against one computed by hand
from single-size descriptors, the batched multi-image path, option parsing, and extract's
record of it (resuming with other factors is refused)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import MainResult

from descmatch.describe import DEFAULT_SIZE_POOL, build_describer, resolve_size_pool
from descmatch.detect import SiftDetector
from descmatch.errors import ConfigError
from descmatch.h5 import Reader
from descmatch.images import read_image


def test_resolve_size_pool() -> None:
    assert resolve_size_pool("auto") == DEFAULT_SIZE_POOL
    assert resolve_size_pool("none") == (1.0,) == resolve_size_pool(None)
    assert resolve_size_pool("0.7,1.4") == (0.7, 1.4)
    assert resolve_size_pool("1") == (1.0,)
    for bad in ("", "0.8,", "a,b", "0,1", "-1", "12"):
        with pytest.raises(ConfigError, match="--size-pool"):
            resolve_size_pool(bad)


@pytest.mark.parametrize("method,ckpt", [("sosnet", "sos.pt"), ("l2net-cs", "cs.pt")])
def test_pooled_descriptor_is_the_normalised_sum_over_sizes(
    scene_dir: Path, ckpt_dir: Path, method: str, ckpt: str
) -> None:
    img = read_image(scene_dir / "img0.png")
    kps = SiftDetector(max_keypoints=60)(img)
    one = build_describer(
        method, str(ckpt_dir / ckpt), precision="fp32", frames="none", size_pool="none"
    )
    pooled = build_describer(
        method, str(ckpt_dir / ckpt), precision="fp32", frames="none", size_pool="0.7,1.4"
    )
    assert pooled.meta["size_pool"] == [0.7, 1.4] and "size_pool" not in one.meta
    parts = [one(img, replace(kps, size=kps.size * np.float32(f), cv=None)) for f in (0.7, 1.4)]
    want = parts[0] + parts[1]
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    got = pooled(img, kps)
    assert got.shape == (len(kps), one.dim)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Pooling differs from the single patch, and from either size alone.
    for single in (one(img, kps), *parts):
        assert not np.allclose(got, single, atol=1e-2)


def test_describe_many_pools_each_image(scene_dir: Path, ckpt_dir: Path) -> None:
    pooled = build_describer(
        "sosnet", str(ckpt_dir / "sos.pt"), precision="fp32", frames="none", size_pool="0.8,1,1.25"
    )
    det = SiftDetector(max_keypoints=40)
    items = [(img, det(img)) for img in (read_image(scene_dir / f"img{i}.png") for i in range(3))]
    items.insert(1, (items[0][0], items[0][1].select(np.zeros(0, np.int64))))  # no keypoints
    many = pooled.describe_many(items)  # type: ignore[attr-defined]
    assert [len(d) for d in many] == [len(k) for _, k in items]
    for (img, k), d in zip(items, many, strict=True):
        np.testing.assert_allclose(d, pooled.describe(img, k), atol=1e-5)  # type: ignore[attr-defined]


def test_size_pool_does_not_apply_to_classical_methods() -> None:
    with pytest.raises(ConfigError, match="--size-pool does not apply"):
        build_describer("rootsift", size_pool="0.8,1.25")
    assert build_describer("rootsift", size_pool="none").name == "rootsift"


def test_extract_records_the_pooling(
    tmp_path: Path, scene_dir: Path, ckpt_dir: Path, call_main: Callable[..., MainResult]
) -> None:
    out = tmp_path / "feats.h5"
    base = [
        "extract",
        str(scene_dir),
        "--method",
        "sosnet",
        "--weights",
        str(ckpt_dir / "sos.pt"),
        "--max-keypoints",
        "50",
        "--precision",
        "fp32",
        "--frames",
        "none",
    ]
    assert call_main(*base, str(out), "--size-pool", "0.7,1.4")[0] == 0
    assert call_main(*base, str(tmp_path / "one.h5"), "--size-pool", "none")[0] == 0
    with Reader(out, "features") as r, Reader(tmp_path / "one.h5", "features") as p:
        assert json.loads(r.attrs["settings"])["size_pool"] == [0.7, 1.4]
        assert "size_pool" not in json.loads(p.attrs["settings"])
        a, b = r.read("img0.png"), p.read("img0.png")
        np.testing.assert_array_equal(a["keypoints"], b["keypoints"])
        assert not np.allclose(a["descriptors"], b["descriptors"], atol=1e-2)
    # Resuming with other factors is refused and leaves the file as it was; a bad value is
    # a one-line error.
    before = out.read_bytes()
    code, _, err = call_main(*base, str(out), "--size-pool", "none")
    assert code != 0 and "settings" in err
    assert out.read_bytes() == before
    code, _, err = call_main(*base, str(tmp_path / "bad.h5"), "--size-pool", "0.8,x")
    assert code != 0 and "--size-pool 0.8,x" in err
    assert not (tmp_path / "bad.h5").exists()
