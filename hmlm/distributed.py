"""Running under torchrun: which process this is, and the few collective operations training needs.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_process(device_type: str) -> Process:
    """Join the process group that torchrun set up: NCCL on CUDA, gloo on the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Process(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """True on every process when it is true on any: a stop request (Ctrl-C, time limit) must stop all ranks
    at the same step, or the others would wait forever in the next gradient all-reduce."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor(float(flag), device=device)).item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
