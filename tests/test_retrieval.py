"""Image retrieval (VLAD over a k-means codebook of the collection's own descriptors) and the
``descmatch pairs`` command: exhaustive, sequential with loop closure, retrieval."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_sfm import make_scene
from typer.testing import CliRunner

from descmatch.cli import app
from descmatch.describe import build_describer
from descmatch.detect import SiftDetector
from descmatch.errors import InputError
from descmatch.extract import extract
from descmatch.images import list_images
from descmatch.pairs import (
    pairs_comment,
    pairs_for,
    read_pairs,
    retrieval,
    sequential_with_loops,
    unique_pairs,
    write_pairs_commented,
)
from descmatch.retrieval import global_descriptors, nearest, train_codebook, vlad

runner = CliRunner()
GROUP = 4  # views per group


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny work: one thread is as fast


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two rendered rooms with different textures, 4 views each, in one folder (a0..a3,
    b0..b3), and their RootSIFT features. Read-only."""
    root = tmp_path_factory.mktemp("two-groups")
    imgs = root / "images"
    for prefix, seed in (("a", 3), ("b", 40)):
        make_scene(root / prefix, GROUP, seed=seed, prefix=prefix)
        for p in (root / prefix / "images").iterdir():
            imgs.mkdir(exist_ok=True)
            shutil.copy(p, imgs / p.name)
    feats = root / "features.h5"
    extract(list_images(imgs), feats, build_describer("rootsift"), SiftDetector(max_keypoints=600))
    return imgs, feats


def test_kmeans_finds_separated_clusters_and_is_seeded() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(200, 2, generator=g) for c in centres])
    cb = train_codebook(x, 3, iters=20, seed=1)
    found = cb.centres[cb.centres[:, 0].argsort()]
    assert sorted(np.round(cb.centres.numpy()).ravel().tolist()) == sorted(
        np.round(centres.numpy()).ravel().tolist()
    ), found
    again = train_codebook(x, 3, iters=20, seed=1)
    torch.testing.assert_close(cb.centres, again.centres)
    # More words than distinct points: capped, no error.
    assert train_codebook(torch.ones(5, 2), 64).size == 5


def test_vlad_is_normalised_and_signed_sqrt() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    cb = train_codebook(x, 4, seed=0)
    v = vlad(x[:50], cb)
    assert v.shape == (32,)
    assert abs(float(v.norm()) - 1) < 1e-5
    # Each word's block had unit norm before the signed square root: undoing the root, all
    # populated blocks have the same norm.
    blocks = (v.sign() * v * v).reshape(4, 8).norm(dim=1)
    populated = blocks > 0
    assert torch.allclose(
        blocks[populated], blocks[populated][0].expand(int(populated.sum())), atol=1e-5
    )
    assert float(vlad(torch.zeros(0, 8), cb).norm()) == 0.0


def test_nearest_skips_self_and_excluded() -> None:
    s = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.5], [0.1, 0.5, 1.0]])
    assert nearest(s, 1) == [[1], [0], [1]]
    assert nearest(s, 5) == [[1, 2], [0, 2], [1, 0]]
    excl = torch.zeros(3, 3, dtype=torch.bool)
    excl[0, 1] = True
    assert nearest(s, 1, exclude=excl)[0] == [2]


def test_retrieval_finds_the_true_neighbours(two_groups: tuple[Path, Path]) -> None:
    _, feats = two_groups
    pairs = retrieval(feats, GROUP - 1)
    # Every image's 3 nearest are the other views of its own room: exactly the 2 x 6
    # within-group pairs, none across.
    assert all(a[0] == b[0] for a, b in pairs), pairs
    assert len(pairs) == 2 * GROUP * (GROUP - 1) // 2
    assert len(set(pairs)) == len(pairs) and all(a != b for a, b in pairs)
    g = global_descriptors(feats)
    s = g.similarity()
    same = torch.tensor([[a[0] == b[0] for b in g.names] for a in g.names])
    off = ~torch.eye(len(g.names), dtype=torch.bool)
    assert float(s[same & off].min()) > float(s[~same].max())
    # Seeded: the same pairs again.
    assert retrieval(feats, GROUP - 1) == pairs


def test_sequential_with_loop_closure(two_groups: tuple[Path, Path]) -> None:
    _, feats = two_groups
    names = [f"a{i}.png" for i in range(GROUP)] + [f"b{i}.png" for i in range(GROUP)]
    plain = sequential_with_loops(names, 1, 0)
    assert len(plain) == len(names) - 1
    loops = sequential_with_loops(names, 1, 1, feats)
    extra = set(loops) - set(plain)
    assert extra and all(a[0] == b[0] for a, b in extra), extra
    # Loop closures reach outside the window: never a pair of neighbours in the sequence.
    idx = {n: i for i, n in enumerate(names)}
    assert all(abs(idx[a] - idx[b]) > 1 for a, b in extra)
    with pytest.raises(InputError, match="features"):
        sequential_with_loops(names, 1, 1, None)


def test_pairs_helpers(tmp_path: Path) -> None:
    assert unique_pairs([("a", "b"), ("b", "a"), ("a", "a"), ("c", "a")]) == [
        ("a", "b"),
        ("c", "a"),
    ]
    assert unique_pairs([("c", "a"), ("b", "a")], ["a", "b", "c"]) == [("a", "b"), ("a", "c")]
    p = write_pairs_commented(tmp_path / "p.txt", [("a", "b")], "made by a test")
    assert pairs_comment(p) == "made by a test" and read_pairs(p) == [("a", "b")]
    assert pairs_for("exhaustive", ["a", "b", "c"]) == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(InputError, match="retrieval:K"):
        pairs_for("retrieval:x", ["a", "b"], tmp_path / "f.h5")
    with pytest.raises(InputError, match="features.h5"):
        pairs_for("retrieval:2", ["a", "b"])


def test_pairs_command(two_groups: tuple[Path, Path], tmp_path: Path) -> None:
    imgs, feats = two_groups
    out = tmp_path / "pairs.txt"
    res = runner.invoke(app, ["pairs", str(feats), str(out), "--pairs", "retrieval:3"])
    assert res.exit_code == 0, res.output
    pairs = read_pairs(out)
    assert len(pairs) == 12 and all(a[0] == b[0] for a, b in pairs)
    assert "12 pairs of 8 images" in res.output

    res = runner.invoke(app, ["pairs", str(imgs), str(out)])
    assert res.exit_code == 0, res.output
    assert len(read_pairs(out)) == 28
    res = runner.invoke(app, ["pairs", str(imgs), str(out), "--pairs", "sequential:2"])
    assert res.exit_code == 0 and len(read_pairs(out)) == 13
    res = runner.invoke(app, ["pairs", str(feats), str(out), "--pairs", "sequential:1+loops:1"])
    assert res.exit_code == 0 and len(read_pairs(out)) > 7

    for args, msg in (
        (["--pairs", "retrieval:2"], "needs a features.h5"),
        (["--pairs", "sequential:2+loops:1"], "needs a features.h5"),
        (["--pairs", "sequential:x"], "sequential:K"),
    ):
        res = runner.invoke(app, ["pairs", str(imgs), str(out), *args])
        assert res.exit_code != 0 and isinstance(res.exception, InputError), args
        assert msg in str(res.exception)
