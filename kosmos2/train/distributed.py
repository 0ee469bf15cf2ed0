"""One process or many under torchrun: who this process is, and the few collective calls the loop makes.

`torchrun --nproc-per-node N kosmos2 train ...` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE in
their environment; `setup` joins them into one process group (gloo on the CPU, nccl on GPUs) and gives each
its device. Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op for rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Whether this process writes files (rank 0)."""
        return self.rank == 0


def current() -> Dist:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0)
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device | str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if there is one (once per process) and return this process's place
    and its device: a "cuda" device becomes cuda:LOCAL_RANK."""
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    me = current()
    if me.world > 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", me.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return me, device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sum of `values` over all processes (the values themselves in one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_dict(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """`all_reduce_sum` of a dict's values, keys kept (the same keys in every process)."""
    return dict(zip(values, all_reduce_sum(list(values.values()), device), strict=True))
