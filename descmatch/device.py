"""Device selection: ``auto`` takes CUDA when present, else the CPU. Under a multi-process
launch (torchrun), ``auto`` and ``cuda`` mean this process's GPU, ``cuda:LOCAL_RANK``."""

from __future__ import annotations

import torch

from .distributed import local_device
from .errors import ConfigError


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return local_device(dev) if dev.index is None else dev
