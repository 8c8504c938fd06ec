"""A features file records the int8 models that described it, so descriptors of the int8
models and of the float nets are never mixed in one file."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

REPO_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"


def test_resuming_an_int8_file_in_fp32_is_refused(
    example_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    call_main,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setenv("DESCMATCH_WEIGHTS", str(REPO_WEIGHTS))
    out = tmp_path / "f.h5"
    common = ["--max-keypoints", "100", "--size-pool", "none", "--frames", "none"]
    code, _, err = call_main(
        "extract", str(example_dir / "view1.jpg"), str(out), "--precision", "int8", *common
    )
    assert code == 0, err
    code, _, err = call_main("extract", str(example_dir), str(out), "--precision", "fp32", *common)
    assert code == 3 and "int8='sosnet-cs.int8.onnx'" in err and "Traceback" not in err
