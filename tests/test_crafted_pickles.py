"""Files from users are never unpickled as code: a ``.pt`` whose pickle calls ``os.system``
goes through every command that loads a user file (weights, frame nets, the shipped-weights
folder) and must be refused with a one-line error, without the command ever running."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import MainResult, run_cli, write_scenes

from descmatch.errors import WeightsError
from descmatch.examples import copy_examples
from descmatch.safe_load import load_torch_file
from descmatch.weights import load_net


class _RunsCommand:
    """Pickles as a call of ``os.system(command)``: loading it with full unpickling runs it."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, (self.command,))


def write_evil(path: Path, marker: Path) -> Path:
    """A torch file that, fully unpickled, creates ``marker``; shaped like a checkpoint."""
    payload = _RunsCommand(f"{sys.executable} -c \"open('{marker}', 'w').write('ran')\"")
    torch.save({"format": "descmatch", "method": "hardnet", "state_dict": payload}, path)
    return path


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(the crafted file, the marker file its pickle would create)."""
    marker = tmp_path / "MARKER-code-ran"
    return write_evil(tmp_path / "evil.pt", marker), marker


def test_the_crafted_file_does_run_code_when_fully_unpickled(evil: tuple[Path, Path]) -> None:
    """The premise of every test here: the file is a working exploit."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


def test_safe_loader_refuses_it_in_one_line(evil: tuple[Path, Path]) -> None:
    path, marker = evil
    with pytest.raises(WeightsError) as e:
        load_torch_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(WeightsError):
        load_net("hardnet", path)
    assert not marker.exists()


def _assert_refused(res: MainResult, evil: Path, marker: Path) -> None:
    code, out, err = res
    assert not marker.exists(), "the pickle's command ran"
    assert code == WeightsError.exit_code, (code, out, err)
    assert "Traceback" not in err and "Unpickling" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if str(evil) in ln]
    assert len(errors) == 1 and "refused" in errors[0], err  # the load was tried, one line


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small inputs each command accepts: images, an HPatches-style sequence, a Strecha
    scene, a Brown patch set, and a working hardnet checkpoint."""
    from fixtures_brown import make_brown_fixture

    from descmatch.nets import build_net
    from descmatch.weights import save_checkpoint

    root = tmp_path_factory.mktemp("pickle-inputs")
    imgs = root / "imgs"
    write_scenes(imgs, 2)
    seq = root / "seq"
    copy_examples(seq)
    for i, v in enumerate(("view1.jpg", "view2.jpg", "view3.jpg"), 1):
        (seq / v).rename(seq / f"{i}.jpg")
    scene = root / "scene"
    (scene / "images").mkdir(parents=True)
    for i in range(2):
        cv2.imwrite(str(scene / "images" / f"{i}.png"), np.full((60, 80), 100, np.uint8))
    eye = "1 0 0 0 1 0 0 0 1"
    (scene / "cameras.txt").write_text(
        f"0.png 80 60 50 50 40 30 {eye} 0 0 0\n1.png 80 60 50 50 40 30 {eye} 1 0 0\n"
    )
    good = save_checkpoint(root / "good-hardnet.pt", build_net("hardnet"), meta={})
    return {
        "imgs": imgs,
        "img0": imgs / "img0.png",
        "img1": imgs / "img1.png",
        "seq": seq,
        "scene": scene,
        "brown": make_brown_fixture(root / "brown"),
        "good": good,
    }


COMMANDS: dict[str, Callable[[dict[str, Path], Path, Path], list[str]]] = {
    "extract --weights": lambda i, e, o: [
        "extract", str(i["imgs"]), str(o / "f.h5"), "-m", "hardnet", "--weights", str(e)
    ],
    "extract --frames": lambda i, e, o: [
        "extract", str(i["imgs"]), str(o / "f.h5"), "-m", "hardnet",
        "--weights", str(i["good"]), "--frames", str(e),
    ],
    "match A B --weights": lambda i, e, o: [
        "match", str(i["img0"]), str(i["img1"]), "-m", "hardnet", "--weights", str(e)
    ],
    "match A B --frames": lambda i, e, o: [
        "match", str(i["img0"]), str(i["img1"]), "-m", "hardnet",
        "--weights", str(i["good"]), "--frames", str(e),
    ],
    "eval homography --weights": lambda i, e, o: [
        "eval", "homography", str(i["seq"]), "-m", "hardnet", "--weights", str(e)
    ],
    "eval epipolar --weights": lambda i, e, o: [
        "eval", "epipolar", str(i["scene"]), "-m", "hardnet", "--weights", str(e)
    ],
    "eval patches --weights": lambda i, e, o: [
        "eval", "patches", str(i["brown"]), "-m", "hardnet", "--weights", str(e)
    ],
    "sfm --weights": lambda i, e, o: [
        "sfm", str(i["imgs"]), str(o / "sfm"), "-m", "hardnet", "--weights", str(e)
    ],
}  # fmt: skip


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_crafted_file(
    command: str,
    inputs: dict[str, Path],
    evil: tuple[Path, Path],
    tmp_path: Path,
    call_main: Callable[..., MainResult],
) -> None:
    if command.startswith("sfm"):
        pytest.importorskip("pycolmap")
    path, marker = evil
    _assert_refused(call_main(*COMMANDS[command](inputs, path, tmp_path)), path, marker)


def test_shipped_weights_folder_with_a_crafted_file(
    evil: tuple[Path, Path],
    inputs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    call_main: Callable[..., MainResult],
) -> None:
    """DESCMATCH_WEIGHTS pointing at a folder that holds a crafted file (as the default net,
    and as a shipped name): listing it, --method auto and --weights NAME all refuse it."""
    path, marker = evil
    folder = tmp_path / "weights"
    folder.mkdir()
    shipped = folder / "hardnet.pt"
    shutil.copy(path, shipped)
    (folder / "DEFAULT").write_text("hardnet\n")
    monkeypatch.setenv("DESCMATCH_WEIGHTS", str(folder))
    _assert_refused(call_main("weights"), shipped, marker)
    out = tmp_path / "f.h5"
    _assert_refused(call_main("extract", str(inputs["imgs"]), str(out)), shipped, marker)
    _assert_refused(
        call_main("extract", str(inputs["imgs"]), str(out), "-m", "hardnet", "-w", "hardnet"),
        shipped,
        marker,
    )
    assert not out.exists()


def test_real_entry_point_refuses_a_crafted_file(
    evil: tuple[Path, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """The installed entry point (a subprocess): exit 4, one line, nothing ran."""
    path, marker = evil
    res = run_cli(
        "extract", str(inputs["imgs"]), str(tmp_path / "f.h5"), "-m", "hardnet", "-w", str(path)
    )
    _assert_refused((res.returncode, res.stdout, res.stderr), path, marker)
    assert not (tmp_path / "f.h5").exists()
