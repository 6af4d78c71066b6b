"""Distributed set-up of the training loop: under ``torchrun`` (``WORLD_SIZE`` > 1) every
process joins a process group (gloo on the CPU, nccl on CUDA) and trains a shard of each epoch;
alone, the loop runs as the single process of rank 0."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mbz.evaluate import pick_device


@dataclass(frozen=True)
class Process:
    """This process's place in a (possibly one-process) training run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that reports and saves."""
        return self.rank == 0


def is_main_process() -> bool:
    """False only in the processes of rank > 0 of a ``torchrun`` launch."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def process_group(device: torch.device | None) -> Iterator[Process]:
    """This process's rank, world size and device; joins torchrun's process group if any."""
    device = device or pick_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Process(0, 1, device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield Process(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()


def all_sum(values: list[float], process: Process) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if process.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=process.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_buffers(model: nn.Module, process: Process) -> None:
    """Give every process rank 0's BatchNorm statistics (they drift apart within an epoch)."""
    if process.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)
