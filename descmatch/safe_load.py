"""The one path by which descmatch reads torch files that users hand it (weights, frame nets,
training checkpoints): ``torch.load(..., weights_only=True)``, so a file never runs code, and
every failure becomes one line naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import DescmatchError, WeightsError


def load_torch_file(
    path: str | Path,
    what: str = "weights file",
    error: type[DescmatchError] = WeightsError,
) -> Any:
    """Load ``path`` as tensors and plain containers only.

    A file whose pickle would construct arbitrary objects (or execute code) is refused with
    ``error`` and a one-line message; nothing in it is run.
    """
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such {what}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it holds Python objects beyond tensors and plain containers, refused"
        raise error(f"{p}: not a loadable {what} ({first[:160]})") from None
