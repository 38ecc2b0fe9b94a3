"""What a training step leaves on the device for logging and checks, and reading it back once per check.

Reading a value that the device computes makes the host wait until the device has finished everything queued
before it, which leaves a GPU idle while the host catches up. So a training step reads nothing back: it returns
its loss, gradient norm, finite flag and boundary counts as device tensors (a StepResult), the loop adds them
up on the device (a LogWindow), and reads the sums once per check, every `log_every` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hmlm.training.distributed import all_reduce_sum


@dataclass
class StepResult:
    """What one training step leaves for logging and checks, all on the device: nothing in a step waits for the
    device to finish (see LogWindow). The eager step and the step captured as a CUDA graph (hmlm/training/cuda_graph.py)
    both return one."""

    loss: torch.Tensor  # () this process's mean loss in nats
    grad_norm: torch.Tensor  # () the gradient norm before clipping, of the gradients DDP averaged
    finite: torch.Tensor  # () bool: loss and gradient norm both finite
    boundaries: torch.Tensor  # (L-1,) float64: boundaries fired in this process's batch, over streams and steps
    positions: int  # streams x steps of this process's batch

    @classmethod
    def of(cls, loss: torch.Tensor, grad_norm: torch.Tensor, boundaries: torch.Tensor) -> StepResult:
        """A step's result from its loss, its gradient norm before clipping and its boundaries (B, T, L-1): the
        eager step and the captured one (hmlm/training/cuda_graph.py) build it alike, on the device."""
        loss, grad_norm = loss.detach(), grad_norm.detach()
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        fired = boundaries.detach().sum(dim=(0, 1), dtype=torch.float64)  # (L-1,)
        return cls(loss, grad_norm, finite, fired, boundaries.shape[0] * boundaries.shape[1])


@dataclass
class WindowTotals:
    """A log window read back to the host: sums over its steps and over all processes."""

    steps: int  # training steps in the window: after_step + 1 .. after_step + steps
    after_step: int  # the last step before the window
    positions: int  # streams x symbols of one process's batches in the window
    loss: float  # sum of the per-process mean losses
    grad_norm: float
    bad_steps: float  # steps with a non-finite loss or gradient norm (counted once per process)
    boundaries: list[float]  # per lower layer: boundaries fired
    stop: bool  # a process was asked to stop (Ctrl-C, SIGTERM)
    time_up: bool  # a process reached train.max_time

    def means(self, world_size: int) -> tuple[float, float]:
        """The mean loss (nats) and gradient norm per step of the global batch, over the window."""
        per_step = self.steps * world_size  # every process adds its own (equal) norm too
        return self.loss / per_step, self.grad_norm / per_step


class LogWindow:
    """Sums of the logged quantities since the last check, kept on the device, and read once per check.

    Reading a value that the device computes makes the host wait for the device to finish, so the loop reads
    only at a check (a logging step, an evaluation, the end of an epoch or of the run): one small tensor,
    all-reduced over the processes under torchrun, with their stop flags, and read in one copy. Non-finite steps
    are counted in it too, so a NaN is found at the next check, at most `log_every` steps late, and always before
    a checkpoint is written."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset(after_step=0)

    def reset(self, after_step: int) -> None:
        """Empty the window, which then holds the steps after `after_step`."""
        self.sums: torch.Tensor | None = None  # (3 + L-1,) float64 on the device: loss, grad norm, bad, boundaries
        self.steps, self.positions, self.after_step = 0, 0, after_step

    def add(self, result: StepResult) -> None:
        # New tensors, queued before the next step: a captured step's result lives in the graph's output buffers,
        # which its next replay overwrites, so adding it here is the copy it needs.
        scalars = torch.stack([result.loss.double(), result.grad_norm.double(), (~result.finite).double()])
        step = torch.cat([scalars, result.boundaries])
        self.sums = step if self.sums is None else self.sums + step
        self.steps += 1
        self.positions += result.positions

    def read(self, stop: bool, time_up: bool, distributed: bool) -> WindowTotals:
        """The window's sums and the stop flags of every process: the one host synchronisation of a check."""
        assert self.sums is not None, "a check comes after a step"
        flags = torch.tensor([float(stop), float(time_up)], dtype=torch.float64).to(self.device)
        packed = torch.cat([self.sums, flags])
        if distributed:
            packed = all_reduce_sum(packed)
        *values, stop_sum, time_sum = packed.tolist()
        loss, grad_norm, bad, *boundaries = values
        return WindowTotals(
            self.steps, self.after_step, self.positions, loss, grad_norm, bad, boundaries, stop_sum > 0, time_sum > 0
        )
