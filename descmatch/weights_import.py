"""Published weight files into descmatch checkpoints, and descmatch weights out to the
layouts of the original code and kornia.

HardNet and SOSNet, as their authors and kornia publish them, are the L2-Net tower in one
``nn.Sequential``: HardNet's under ``features.N`` (the authors' files wrap the state dict
in ``{"state_dict": ...}``), SOSNet's under ``layers.N`` (a bare state dict; layer 0 is the
instance norm, which holds no tensors). kornia's ``HardNet`` and ``SOSNet`` modules use the
same keys, so a ``state_dict()`` saved from them imports too. The tensors map one to one,
in order, onto descmatch's tower (``tower.first``, ``tower.middle``, ``tower.head``); the
mapping checks every tensor's kind (weight, running mean, ...) and shape.

The per-patch normalisation matches too (HardNet: per-patch mean and standard deviation;
SOSNet: instance norm; both L2-normalise the output), so an imported net computes the
original's descriptors: within 1e-5 of kornia's forward in fp32 (HardNet standardises with
eps 1e-7 where kornia uses 1e-6).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError, WeightsError
from .nets import DescriptorNet, build_net
from .safe_load import load_torch_file
from .weights import save_checkpoint, sha256


@dataclass(frozen=True)
class ForeignLayout:
    """How the original code (and kornia) keys a net's tensors."""

    net: str  # descmatch's net
    prefix: str  # the Sequential's attribute name
    origin: str  # in words, for messages and the checkpoint's record


#: The nets whose published layouts import, by descmatch net name.
LAYOUTS: dict[str, ForeignLayout] = {
    "hardnet": ForeignLayout(
        "hardnet", "features", "HardNet (DagnyT/hardnet checkpoints, kornia.feature.HardNet)"
    ),
    "sosnet": ForeignLayout(
        "sosnet", "layers", "SOSNet (yuruntian/SOSNet 32x32 models, kornia.feature.SOSNet)"
    ),
}

_SUFFIX_RANK = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
_SUFFIX_RANK["num_batches_tracked"] = 4
_KEY = re.compile(r"^(?:module\.)?(?P<prefix>[A-Za-z_]\w*)\.(?P<index>\d+)\.(?P<suffix>\w+)$")


def _suffix(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_state(
    src: Mapping[str, torch.Tensor], dst: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """``src``'s tensors under ``dst``'s keys, matched in order; every pair must be the
    same kind of tensor (the key's last part) with the same shape.

    Raises WeightsError (``what`` names the source) on the first mismatch.
    """
    if len(src) != len(dst):
        raise WeightsError(f"{what}: {len(src)} tensors where the net has {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for (ks, v), (kd, w) in zip(src.items(), dst.items(), strict=True):
        if _suffix(ks) != _suffix(kd) or tuple(v.shape) != tuple(w.shape):
            raise WeightsError(f"{what}: {ks} {tuple(v.shape)} does not fit {kd} {tuple(w.shape)}")
        out[kd] = v.detach().clone().to(w.dtype)
    return out


def unwrap_state(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a loaded file: bare, or under ``"state_dict"`` (HardNet's files)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{what}: holds no state dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{what}: holds no state dict ({bad[0]!r} is not a tensor)")
    return dict(obj)


def foreign_to_descmatch(
    net: str, state: Mapping[str, torch.Tensor], what: str = "weights"
) -> dict[str, torch.Tensor]:
    """A published (or kornia) state dict of ``net`` under descmatch's keys.

    Keys may carry a ``module.`` prefix (files saved from DataParallel); they are taken in
    the order of their layer index. Raises WeightsError for keys of another layout.
    """
    layout = _layout(net)
    parsed = []
    for k, v in state.items():
        m = _KEY.match(k)
        if m is None or m["prefix"] != layout.prefix:
            raise WeightsError(
                f"{what}: key {k!r} is not in the {layout.origin} layout "
                f"({layout.prefix}.N.weight, ...)"
            )
        parsed.append(((int(m["index"]), _SUFFIX_RANK.get(m["suffix"], 9)), k, v))
    ordered = {k: v for _, k, v in sorted(parsed, key=lambda t: t[0])}
    return map_state(ordered, build_net(net).state_dict(), what)


def descmatch_to_foreign(net: DescriptorNet, template: Mapping[str, torch.Tensor]) -> dict:
    """``net``'s tensors under the keys of ``template`` (the state dict of the original
    module, e.g. ``kornia.feature.HardNet(pretrained=False).state_dict()``)."""
    return map_state(net.state_dict(), template, f"{net.name} weights")


def _layout(net: str) -> ForeignLayout:
    try:
        return LAYOUTS[net]
    except KeyError:
        raise WeightsError(
            f"{net}: no published layout imports into it; choose one of {', '.join(LAYOUTS)}"
        ) from None


def default_import_path(source: str | Path, net: str) -> Path:
    """``weights/<net>-<source file stem>.pt`` in the current folder."""
    return Path("weights") / f"{net}-{Path(source).stem}.pt"


def import_weights(
    source: str | Path, net: str, out: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Convert a published weight file of ``net`` into a descmatch checkpoint at ``out``
    (default :func:`default_import_path`), loadable with ``--weights``; it records the
    source file's name and sha256. The file is read as tensors only (never as code).

    Raises WeightsError for a file that is not such weights, OutputError for an existing
    ``out`` (unless ``overwrite``) or a missing folder.
    """
    source = Path(source)
    layout = _layout(net)
    out = Path(out) if out is not None else default_import_path(source, net)
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists; pass --overwrite to replace it")
    obj = load_torch_file(source, "weights file", WeightsError)
    if isinstance(obj, Mapping) and obj.get("format") == "descmatch":
        raise WeightsError(f"{source}: is a descmatch checkpoint already; use it with --weights")
    state = foreign_to_descmatch(net, unwrap_state(obj, str(source)), str(source))
    model = build_net(net)
    model.load_state_dict(state, strict=True)
    if out.parent != Path("") and not out.parent.is_dir():
        if out.parent == Path("weights"):
            out.parent.mkdir()
        else:
            raise OutputError(f"{out}: folder {out.parent} does not exist")
    digest = sha256(source)
    meta = {
        "data": f"imported from {source.name}",
        "source": source.name,
        "source_sha256": digest,
        "source_layout": layout.origin,
        "headline": f"imported ({digest[:12]})",
    }
    return save_checkpoint(out, model, meta)
