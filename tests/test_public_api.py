"""The package root is the public API: every advertised name resolves, lazily."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

import descmatch


def test_every_public_name_resolves() -> None:
    for name in descmatch.__all__:
        assert getattr(descmatch, name) is not None, name
    assert set(descmatch.__all__) == {"__version__", *descmatch._API}


def test_import_is_light() -> None:
    code = "import sys, descmatch; print('torch' in sys.modules, 'cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        descmatch.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_detectors_satisfy_the_protocol() -> None:
    for name in descmatch.DETECTORS:
        assert isinstance(descmatch.build_detector(name), descmatch.Detector)


def test_match_images_on_the_examples(example_dir: Path) -> None:
    """The two-image pipeline from Python: RootSIFT on two example views, inliers that agree
    with the true homography."""
    det = descmatch.build_detector("sift", max_keypoints=1000)
    desc = descmatch.build_describer("rootsift")
    res = descmatch.match_images(
        example_dir / "view1.jpg", example_dir / "view2.jpg", det, desc, geometry="homography"
    )
    h = np.loadtxt(example_dir / "H_1_2")
    xy = np.c_[res.xy0, np.ones(len(res.xy0))] @ h.T
    err = np.linalg.norm(xy[:, :2] / xy[:, 2:] - res.xy1, axis=1)
    assert res.inliers.sum() >= 50
    assert np.median(err[res.inliers]) < 1.5
    assert res.matches.shape == (len(res.inliers), 2)
