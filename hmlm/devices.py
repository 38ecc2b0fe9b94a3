"""Which device a command runs on: `auto`, `cpu`, `cuda` or `cuda:N`, checked against what this machine has.

One function for every command (`hmlm train`'s `train.device`, and `--device` of eval, sample, boundaries and
bench), so that they accept the same strings and refuse the same mistakes with the same kind of message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hmlm.errors import UserError

DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def available_devices() -> list[str]:
    """What this machine can run on, by name: `cpu`, then `cuda:0` ... `cuda:N-1`."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["cpu", *(f"cuda:{i}" for i in range(count))]


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """The torch device that `name` stands for here: `auto` takes CUDA when present, else the CPU.

    `option` names where the string came from (`--device`, `train.device`) in the one-line error a user gets for
    a device this machine lacks or a string that names no device."""
    available = ", ".join(available_devices())
    if not DEVICE_NAME.fullmatch(name):
        raise UserError(f"{option} must be auto, cpu, cuda or cuda:N, not {name!r} (available here: {available})")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option} {name}: no CUDA device is available here (available: {available}); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{option} {name}: this machine has no such device (available: {available})")
    # A plain `cuda` stays torch's "current device": naming its index here would start CUDA on GPU 0 in every
    # torchrun process before each takes its own GPU (hmlm/training/distributed.py).
    return device


def local_cuda_device(local_rank: int) -> torch.device:
    """The GPU of a torchrun process: its LOCAL_RANK modulo the devices it can see, so that one process per GPU
    works both where every process sees all of the node's GPUs and where each sees only its own (as under SLURM
    with per-task CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device`. To a GPU, through pinned memory and without blocking, so that the copy
    overlaps the work already queued (a copy from pageable memory waits for it); on the CPU, nothing to do."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


_rehearsing = False  # see rehearsing_capture


def capturing(tensor: torch.Tensor) -> bool:
    """Whether work on `tensor` is being captured into a CUDA graph now (or a capture is being rehearsed)."""
    return _rehearsing or (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


@contextmanager
def rehearsing_capture() -> Iterator[None]:
    """Within, `capturing` says yes for any tensor: the code that a captured region runs takes the branches it
    takes under capture, on the CPU too, so that tests (and the ahead-of-time compile check) see what a capture
    would launch without a GPU."""
    global _rehearsing
    saved, _rehearsing = _rehearsing, True
    try:
        yield
    finally:
        _rehearsing = saved
