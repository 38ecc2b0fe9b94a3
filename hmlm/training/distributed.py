"""Running under torchrun: which process this is, and the few collective operations training needs.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hmlm.devices import local_cuda_device


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes logs, TensorBoard and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_process(device: torch.device) -> tuple[Process, torch.device]:
    """Join the process group that torchrun set up, as torch documents it: on CUDA, each process first takes its
    own GPU (LOCAL_RANK modulo the GPUs it sees) with `torch.cuda.set_device`, then joins with NCCL bound to that
    device (`device_id`); on the CPU it joins with gloo. Returns the process and the device it trains on."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = local_cuda_device(local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    process = Process(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    return process, device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Every process's `tensor` (the same shape and dtype on all), in rank order, on the CPU. The exchange goes
    through `device`, since NCCL moves only GPU tensors."""
    if not dist.is_initialized():
        return [tensor.cpu()]
    local = tensor.to(device).contiguous()
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, local)
    return [piece.cpu() for piece in pieces]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown(together: bool = True) -> None:
    """Leave the process group. `together` (every process got here without an error) first waits for the others,
    so no process closes its connections while a peer still uses them; after an error it would wait forever."""
    if dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
