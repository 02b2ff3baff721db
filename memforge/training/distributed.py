"""Running on several processes (``torchrun``): process group, ranks, DDP wrapping, reductions.

``torchrun --nproc_per_node=N -m memforge train ...`` sets ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`setup` reads them and joins the group
(gloo on the CPU, nccl on GPUs, one GPU per local rank). A single process needs none of it.
"""

from __future__ import annotations

import os

import attrs
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from memforge.training.config import TrainingError, resolve_device


@attrs.frozen
class Distributed:
    """This process's place among the training processes.

    Attributes:
        rank: this process's index; rank 0 alone writes files and prints.
        world_size: number of processes.
        local_rank: index on this machine (picks the GPU).
        device: the device this process trains on.
        owns_group: whether :func:`setup` created the process group (and so must destroy it).
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when there are several processes, else as is."""
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, value: Tensor) -> float:
        """The mean of a scalar tensor over all processes."""
        if self.world_size == 1:
            return float(value.detach())
        total = value.detach().float().reshape(1).clone()
        dist.all_reduce(total)
        return float(total) / self.world_size

    def max_int(self, value: int) -> int:
        """The largest of an integer over all processes (no communication for one process).

        Every process must call it at the same point; used to agree on whether to go on.
        """
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return int(total)

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        """Leave the process group if :func:`setup` joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise TrainingError(f"environment variable {name}={value!r} is not an integer; "
                            f"launch with torchrun, which sets it") from None


def is_main_process() -> bool:
    """Whether this process is rank 0 (or the only one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


def setup(device: str) -> Distributed:
    """Join the process group ``torchrun`` describes (if any) and pick this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    torch_device = resolve_device(device, local_rank)
    owns = False
    if world_size > 1 and not dist.is_initialized():
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size)
        owns = True
    return Distributed(rank, world_size, local_rank, torch_device, owns)
