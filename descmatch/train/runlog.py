"""A run's logs (``train_log.csv`` and ``train_log.json`` in its folder, rewritten atomically
after every logged step) and the name of the hardware it ran on."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text

LOG_CSV = "train_log.csv"
LOG_JSON = "train_log.json"


def write_logs(
    out_dir: Path, rows: list[dict[str, Any]], header: dict[str, Any], columns: Sequence[str]
) -> None:
    """The CSV (``columns`` of every row, empty where a row has no value) and the JSON (the
    ``header`` and every row whole)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    atomic_write_text(out_dir / LOG_CSV, buf.getvalue())
    atomic_write_text(out_dir / LOG_JSON, json.dumps({**header, "rows": rows}, indent=1))


def read_log(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``train_log.json`` (empty when there is none or it is unreadable)."""
    p = Path(out_dir) / LOG_JSON
    if not p.is_file():
        return []
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return []
    rows = data.get("rows", []) if isinstance(data, dict) else []
    return [r for r in rows if isinstance(r, dict) and isinstance(r.get("step"), int)]


def hardware_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    model = model or platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"
