"""descmatch: local feature extraction and matching with learned patch descriptors.

The public API, importable from the package root::

    from descmatch import build_detector, build_describer, extract, list_images, match
    from descmatch import match_images, pairs_for, run_sfm, export_colmap

Names are imported on first use, so ``import descmatch`` (and the command line) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

#: public name -> module that defines it (relative to the package)
_API: dict[str, str] = {
    # images and keypoints
    "list_images": ".images",
    "read_image": ".images",
    "ImageList": ".images",
    "Keypoints": ".detect",
    "Detector": ".detect",
    "DETECTORS": ".detect",
    "build_detector": ".detect",
    # descriptors
    "Describer": ".describe",
    "build_describer": ".describe",
    "method_choices": ".describe",
    "load_net": ".weights",
    "list_weights": ".weights",
    "NETS": ".nets",
    # pipeline stages
    "extract": ".extract",
    "ExtractResult": ".extract",
    "match": ".match",
    "MatchResult": ".match",
    "match_descriptors": ".matcher",
    "match_images": ".two_view",
    "TwoViewMatches": ".two_view",
    "pairs_for": ".pairs",
    "read_pairs": ".pairs",
    "write_pairs": ".pairs",
    "run_sfm": ".sfm",
    "SfmConfig": ".sfm",
    "SfmResult": ".sfm",
    "export_colmap": ".export.colmap",
    # files and errors
    "Reader": ".h5",
    "DescmatchError": ".errors",
    "InputError": ".errors",
    "OutputError": ".errors",
    "WeightsError": ".errors",
    "ConfigError": ".errors",
}

__all__ = [
    "__version__",
    "list_images",
    "read_image",
    "ImageList",
    "Keypoints",
    "Detector",
    "DETECTORS",
    "build_detector",
    "Describer",
    "build_describer",
    "method_choices",
    "load_net",
    "list_weights",
    "NETS",
    "extract",
    "ExtractResult",
    "match",
    "MatchResult",
    "match_descriptors",
    "match_images",
    "TwoViewMatches",
    "pairs_for",
    "read_pairs",
    "write_pairs",
    "run_sfm",
    "SfmConfig",
    "SfmResult",
    "export_colmap",
    "Reader",
    "DescmatchError",
    "InputError",
    "OutputError",
    "WeightsError",
    "ConfigError",
]

if TYPE_CHECKING:
    from .describe import Describer, build_describer, method_choices
    from .detect import DETECTORS, Detector, Keypoints, build_detector
    from .errors import ConfigError, DescmatchError, InputError, OutputError, WeightsError
    from .export.colmap import export_colmap
    from .extract import ExtractResult, extract
    from .h5 import Reader
    from .images import ImageList, list_images, read_image
    from .match import MatchResult, match
    from .matcher import match_descriptors
    from .nets import NETS
    from .pairs import pairs_for, read_pairs, write_pairs
    from .sfm import SfmConfig, SfmResult, run_sfm
    from .two_view import TwoViewMatches, match_images
    from .weights import list_weights, load_net


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'descmatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
