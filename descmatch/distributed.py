"""Data-parallel runs under ``torchrun`` (or any launcher that sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous variables).

:func:`session` joins the process group when the environment says more than one process was
started (gloo on the CPU, NCCL on CUDA) and yields a :class:`Dist`; in a plain process it
yields the single-process ``Dist`` and does nothing. ``extract``, ``match`` and ``train``
use it, so ``torchrun --nproc_per_node N -m descmatch extract|match|train ...`` shards the
work across N processes (and nodes: ``--nnodes``, ``--rdzv-endpoint``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLI asks for the rank early
    import torch
    from torch import Tensor

#: Generous: ranks wait at the end of a stage for the slowest one (a large shard of images).
DIST_TIMEOUT = timedelta(hours=4)


@dataclass
class Dist:
    """This process's place in a data-parallel run (``active``: a process group is used)."""

    rank: int = 0
    world_size: int = 1
    active: bool = False

    @property
    def main(self) -> bool:
        return not self.active or self.rank == 0

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def mean(self, values: Tensor) -> Tensor:
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(values)
            values = values / self.world_size
        return values

    def any(self, flag: bool, device: torch.device) -> bool:
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items`` (every world_size-th item, from its rank)."""
        return items[self.rank :: self.world_size] if self.active else items


def launch_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when torchrun (or the like) started more than one
    process, else None."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if world <= 1:
        return None
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def local_device(device: torch.device) -> torch.device:
    """Under a multi-process launch, CUDA means this process's own GPU (``cuda:LOCAL_RANK``)."""
    env = launch_env()
    if env is None or device.type != "cuda":
        return device
    import torch

    return torch.device("cuda", env[2] % max(1, torch.cuda.device_count()))


@contextmanager
def session(device: torch.device | None = None) -> Iterator[Dist]:
    """Join the process group for the duration of a stage when launched as several processes.

    An existing process group (made by the caller) is used and left alone; one made here is
    destroyed on exit.
    """
    env = launch_env()
    if env is None:
        yield Dist()
        return
    import torch
    import torch.distributed as dist

    rank, world, _ = env
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(local_device(device))  # type: ignore[arg-type]
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
    try:
        yield Dist(rank, world, True)
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
