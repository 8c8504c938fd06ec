"""Training checkpoints: reading one safely and the resume rules, the same for every method.

``<out>/checkpoint.pt`` holds the net (method, conf, weights), the optimiser, the schedule, the
gradient scaler, the step, the training seconds, the random states (every rank's in a
data-parallel run), the run's settings (``config``), the objective's own state (what the
hard-negative sampler mined) and the last validation. It is read with
``torch.load(weights_only=True)`` (:func:`~descmatch.safe_load.load_torch_file`): a file that
would build arbitrary objects is refused with one line, nothing in it is run.

Resume rules (:func:`check_resume`): a run continues with the settings it was started with.
Only the settings in :data:`RESUMABLE` may change: ``steps`` (a larger number extends the run,
a smaller one ends it sooner; the learning-rate schedule is recomputed over the new total from
the step reached), the time limit, how often it checkpoints, validates and logs, the device,
precision and number of processes, the pool-building workers and the run folder's
location. Any other difference (data,
seed, batch size, loss, sampler, net...) is an error that names the setting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..safe_load import load_torch_file

CHECKPOINT = "checkpoint.pt"
#: Settings a resumed run may change (every other one must equal the checkpoint's).
RESUMABLE = frozenset(
    {
        "steps",
        "time_limit_s",
        "checkpoint_every",
        "eval_every",
        "log_every",
        "device",
        "precision",
        "resume",
        "command",
        "pool_workers",
        "rank",
        "world_size",
        "eval_batch_size",
        "out_dir",
    }
)
_REQUIRED = ("method", "state_dict", "optimizer", "scheduler", "step", "config")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint's contents, checked to be one of ours (one-line InputError
    otherwise: not a file, not loadable as plain data, or missing what a resume needs)."""
    ck = load_torch_file(path, "training checkpoint", InputError)
    if not isinstance(ck, dict) or ck.get("format") != "descmatch":
        raise InputError(f"{path}: not a descmatch training checkpoint")
    missing = [k for k in _REQUIRED if k not in ck]
    if missing or not isinstance(ck.get("config"), dict):
        raise InputError(
            f"{path}: not a descmatch training checkpoint (no {', '.join(missing) or 'config'})"
        )
    if "rng" not in ck:
        raise InputError(
            f"{path}: saved by an older descmatch without its random states; "
            "it cannot be resumed exactly (start a new run)"
        )
    return ck


def check_resume(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume the run saved with settings ``saved`` with settings ``now`` when any
    setting outside :data:`RESUMABLE` differs; the message names the first one."""
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE:
            continue
        a, b = _norm(saved.get(key)), _norm(now.get(key))
        if a != b:
            raise ConfigError(
                f"{path}: the run was started with {key}={json.dumps(a)}, now "
                f"{key}={json.dumps(b)}; resume with the same settings (only "
                f"{', '.join(sorted(RESUMABLE - {'resume', 'rank', 'world_size', 'command'}))}"
                " may change)"
            )


def _norm(v: Any) -> Any:
    """A setting as it reads back from JSON (tuples as lists)."""
    return json.loads(json.dumps(v, default=str))
