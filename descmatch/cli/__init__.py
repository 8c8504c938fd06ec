"""The descmatch command line: a thin Typer layer over the library.

The only package that imports typer or rich. ``app`` holds the commands, one module per
group (features: detect/extract/match, pairs, sfm: sfm/export, evaluate, train, weights);
``options`` declares the options several commands share once; ``main`` is the console entry
point, which turns a DescmatchError into one line on stderr and its exit code.
"""

from __future__ import annotations

from . import evaluate, features, pairs, sfm, train, weights
from .app import _state, app, main

__all__ = ["app", "main", "_state", "evaluate", "features", "pairs", "sfm", "train", "weights"]
