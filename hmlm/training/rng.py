"""Random number streams of a training run: one per process, saved and restored for an exact resume.

What draws random numbers while training is the `boundary: sample` noise (torch.bernoulli on the global
generator of the device the model runs on). Every process must draw its own noise, or the N processes of a
torchrun run would repeat one another's draws on their different streams; and every process's generators (the
CPU's and its GPU's) must be saved and restored, or a resumed run would not continue where it stopped.

The checkpoint holds `{"ranks": [{"torch": CPU state, "cuda": this process's GPU state or None}, ...]}`, one entry
per process in rank order. Checkpoints from before it held `{"torch": CPU state, "cuda": [state per visible GPU]}`,
main process only; they still resume (into process 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hmlm.training.distributed import all_gather


def seed_process(seed: int, rank: int) -> None:
    """Called after the model is built from `seed` (identical on every process). Process 0 carries on with that
    stream, so a single-process run draws what it always drew; process r > 0 starts from `seed + r`."""
    if rank:
        torch.manual_seed(seed + rank)


def capture(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's generator states: the CPU's and, on CUDA, its own GPU's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def gather(device: torch.device) -> list[dict[str, torch.Tensor | None]]:
    """Every process's `capture`, in rank order (every process must call this; the main one saves it)."""
    mine = capture(device)
    cpu = all_gather(mine["torch"], device)
    cuda = all_gather(mine["cuda"], device) if mine["cuda"] is not None else [None] * len(cpu)
    return [{"torch": a, "cuda": b} for a, b in zip(cpu, cuda, strict=True)]


def restore(saved: dict[str, Any], rank: int, device: torch.device, seed: int, step: int) -> None:
    """Set this process's generators from a checkpoint's `rng` entry. A process that the checkpoint has no state
    for (a resume with more processes than saved it) is seeded from (seed, rank, step): deterministic, and
    different from every other process's stream."""
    ranks = saved.get("ranks")
    if ranks is None:  # the format from before per-process states: the main process's only
        cuda_state = None
        if device.type == "cuda":  # it kept the state of every GPU it saw: take this device's
            index = device.index if device.index is not None else torch.cuda.current_device()
            legacy = saved.get("cuda") or []
            cuda_state = legacy[index] if index < len(legacy) else None
        ranks = [{"torch": saved["torch"], "cuda": cuda_state}]
    if rank >= len(ranks):
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))
        return
    torch.set_rng_state(ranks[rank]["torch"])
    if device.type == "cuda" and ranks[rank]["cuda"] is not None:
        torch.cuda.set_rng_state(ranks[rank]["cuda"], device)
