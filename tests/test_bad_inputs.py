"""Meaningless or unbounded option values are refused up front, with one line; an image that
cannot share the single camera is named."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import MainResult, write_scenes

from descmatch.errors import InputError
from descmatch.retrieval import MAX_WORDS, global_descriptors


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.01", "nan"])
@pytest.mark.parametrize("command", ["match", "sfm", "eval-homography", "eval-epipolar"])
def test_ratio_outside_0_1_is_refused(
    ratio: str,
    command: str,
    example_features: Path,
    tmp_path: Path,
    call_main: Callable[..., MainResult],
) -> None:
    args = {
        "match": ["match", str(example_features), str(tmp_path / "m.h5")],
        "sfm": ["sfm", str(tmp_path), str(tmp_path / "out")],
        "eval-homography": ["eval", "homography", str(tmp_path)],
        "eval-epipolar": ["eval", "epipolar", str(tmp_path)],
    }[command]
    code, out, err = call_main(*args, "--ratio", ratio)
    assert code == 2, (out, err)
    assert "--ratio" in err and "(0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "m.h5").exists() and not (tmp_path / "out").exists()


def test_ratio_one_still_disables_the_test(
    example_features: Path, tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    code, out, err = call_main(
        "match", str(example_features), str(tmp_path / "m.h5"), "--ratio", "1"
    )
    assert code == 0, err


def test_too_many_words_are_refused_at_once(
    example_features: Path, tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    t0 = time.perf_counter()
    code, out, err = call_main(
        "pairs", str(example_features), str(tmp_path / "p.txt"), "--pairs", "retrieval:2",
        "--words", "100000",
    )  # fmt: skip
    assert code == 2 and "--words" in err and "Traceback" not in err
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "p.txt").exists()
    with pytest.raises(InputError, match="--words"):
        global_descriptors(example_features, words=MAX_WORDS + 1)


def test_words_beyond_the_descriptors_are_reduced_with_a_warning(
    example_features: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A sample of 321 descriptors (107 of each of the 3 images) supports 20 words (16
    descriptors each): asking for the maximum is reduced to that, instead of running for
    minutes on a codebook of as many words as descriptors."""
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="descmatch.retrieval"):
        g = global_descriptors(example_features, words=MAX_WORDS, sample=321)
    assert time.perf_counter() - t0 < 30
    assert g.codebook.size == 321 // 16
    assert "--words 1024" in caplog.text and "using 20" in caplog.text


def test_sfm_names_the_image_whose_size_differs(
    tmp_path: Path, call_main: Callable[..., MainResult]
) -> None:
    pytest.importorskip("pycolmap")
    d = tmp_path / "imgs"
    write_scenes(d, 3, 240, 180)
    cv2.imwrite(str(d / "tiny.png"), np.zeros((1, 1), np.uint8))
    code, out, err = call_main(
        "sfm", str(d), str(tmp_path / "out"), "-m", "rootsift", "--max-keypoints", "300"
    )
    assert code == 2, (out, err)
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "tiny.png (1x1)" in line[0] and "240x180" in line[0]
    assert "--camera-mode per-image" in line[0]
