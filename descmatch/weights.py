"""Shipped and user weights: resolve a name to a file, load it into its net, list them.

A descmatch checkpoint is a dict ``{"format": "descmatch", "method", "conf", "state_dict",
"meta"}`` (training checkpoints add optimiser state); ``meta`` records the training data,
steps and metrics. Foreign files holding a bare state dict, or one under "state_dict" (as
HardNet's original files do), load too when the method is given.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError
from .nets import MODELS, DescriptorNet, build_net
from .safe_load import load_torch_file


def weights_dir() -> Path:
    """``$DESCMATCH_WEIGHTS``, else the installed package's weights, else the repo's."""
    env = os.environ.get("DESCMATCH_WEIGHTS")
    if env:
        return Path(env)
    try:
        import descmatch._weights as pkg  # installed: weights/ ships as descmatch._weights

        return Path(next(iter(pkg.__path__)))
    except (ImportError, StopIteration):
        return Path(__file__).resolve().parent.parent / "weights"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_method() -> str | None:
    """The shipped learned net that ``--method auto`` uses (named in weights/DEFAULT)."""
    f = weights_dir() / "DEFAULT"
    if f.is_file():
        name = f.read_text().strip()
        if name and (weights_dir() / f"{name}.pt").is_file():
            return name
    return None


def resolve(method: str, weights: str | Path | None = None) -> Path:
    """The weights file for a method: an explicit path, else weights/<method>.pt."""
    if weights is not None:
        p = Path(weights)
        if p.is_file():
            return p
        shipped = weights_dir() / f"{weights}.pt"
        if shipped.is_file():
            return shipped
        raise WeightsError(f"{weights}: no such weights file")
    p = weights_dir() / f"{method}.pt"
    if not p.is_file():
        raise WeightsError(
            f"{method}: no trained weights ship with this install ({p}); train them with "
            f"`descmatch train --method {method}` or pass --weights PATH"
        )
    return p


def _load(path: Path) -> Any:
    return load_torch_file(path, "weights file", WeightsError)


@dataclass
class LoadedNet:
    net: DescriptorNet  # or a FrameNet ("frames")
    path: Path
    sha256: str
    meta: dict[str, Any]


def weights_method(weights: str | Path, method: str) -> str | None:
    """The method a descmatch weights file (a path or shipped name) records, else None."""
    ckpt = _load(resolve(method, weights))
    if isinstance(ckpt, dict) and ckpt.get("format") == "descmatch":
        return str(ckpt.get("method"))
    return None


def load_net(method: str, weights: str | Path | None = None) -> LoadedNet:
    """Build ``method``'s net and load trained weights into it (strict)."""
    if method not in MODELS:
        raise WeightsError(f"{method}: not a learned net ({', '.join(MODELS)})")
    path = resolve(method, weights)
    ckpt = _load(path)
    conf: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    if isinstance(ckpt, dict) and ckpt.get("format") == "descmatch":
        if ckpt.get("method") != method:
            raise WeightsError(f"{path}: weights of {ckpt.get('method')}, not {method}")
        conf, meta, state = ckpt.get("conf", {}), ckpt.get("meta", {}), ckpt["state_dict"]
    elif isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
    elif isinstance(ckpt, dict) and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise WeightsError(f"{path}: holds no state dict")
    net = build_net(method, conf)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise WeightsError(f"{path}: does not fit {method}: {first[:160]}") from None
    net.eval()
    return LoadedNet(net, path, sha256(path), meta)


@dataclass
class WeightsInfo:
    name: str
    net: str
    data: str
    sha256: str
    metric: str
    path: Path


_SOURCE = re.compile(r"(?P<kind>[\w-]+):(?P<path>[^\s;@()]+)")


def data_label(data: str) -> str:
    """A training record's data sources named by their data-set folders, not by the paths of
    the machine that trained them: ``photos:../x/data/photos@2`` -> ``photos:photos@2``."""

    def short(m: re.Match[str]) -> str:
        parts = [q for q in m["path"].replace("\\", "/").split("/") if q not in ("", ".", "..")]
        if "data" in parts:  # the shared data root: keep what follows it
            parts = parts[len(parts) - parts[::-1].index("data") :]
        else:
            parts = parts[-1:]
        return f"{m['kind']}:{'/'.join(parts) or m['path']}"

    return _SOURCE.sub(short, data)


def list_weights() -> list[WeightsInfo]:
    out = []
    for p in sorted(weights_dir().glob("*.pt")):
        ckpt = _load(p)
        meta = ckpt.get("meta", {}) if isinstance(ckpt, dict) else {}
        out.append(
            WeightsInfo(
                name=p.stem,
                net=str(ckpt.get("method", "?")) if isinstance(ckpt, dict) else "?",
                data=data_label(str(meta.get("data", "?"))),
                sha256=sha256(p),
                metric=str(meta.get("headline", "")),
                path=p,
            )
        )
    return out


def save_checkpoint(
    path: str | Path, net: DescriptorNet, meta: dict[str, Any], **extra: Any
) -> Path:
    """Write a checkpoint that alone rebuilds its net (atomically)."""
    path = Path(path)
    obj = {
        "format": "descmatch",
        "method": net.name,
        "conf": dict(net.conf),
        "state_dict": net.state_dict(),
        "meta": meta,
        **extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path
