"""Locked streams: a boundary layer that fires on every step and never stops.

An HM-LSTM can have a second, degenerate regime besides the one it learned. Once the highest boundary layer fires
(z = 1), the next step is a FLUSH, which takes the top-down input from the layer above; the layer above, updated
on every step instead of at the ends of segments, moves to states it never had in training, and from those the
detector fires again. The layer then fires on every step, its cell keeps no memory (every step flushes it), and
the stream reads at several bits per character for as long as it runs. Read from the zero state, which training
meets only at step 0 unless `train.reset_every` restarts streams, some streams of a model can fall into it
(docs: "Locked streams").

A stream is *locked* when its highest boundary layer fires on more than `LOCK_RATE` of its last `LOCK_TAIL` steps
(all its steps when it is shorter). Only the highest layer is judged: a lower layer can legitimately fire on most
symbols (the paper's models fire layer 1 on 60-85% of them), while the highest one closes the longest segments.

`LockWatch` follows the streams of an evaluation (or a sample) batch by batch, from what that pass computes anyway
(each step's boundaries and each symbol's loss), so finding the locks costs no second pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOCK_RATE = 0.9  # a stream whose highest boundary layer fires more often than this at its end is locked
LOCK_TAIL = 200  # the last steps of a stream over which that rate is taken


@dataclass
class Locks:
    """The locked streams of one pass over a split."""

    streams: int  # streams read
    locked: int  # of them, locked
    layer: int  # the layer judged (1-based), 0 for a model without boundaries
    tokens: int  # predicted tokens in the locked streams
    nll: float  # their summed negative log-likelihood, nats

    @property
    def bpc(self) -> float | None:
        """Bits per character on the locked streams alone; None when none is locked."""
        return self.nll / self.tokens / math.log(2) if self.tokens else None

    def warning(self) -> str | None:
        """One line for the user where a stream locked, else None."""
        if not self.locked:
            return None
        return (f"warning: {self.locked} of {self.streams} streams locked (layer {self.layer} fires on every step "
                f"from some point on, {self.bpc:.2f} bpc on them): the model never learned to start from the zero "
                f"state; train with train.reset_every (e.g. 50) so that training meets fresh starts")  # fmt: skip


def locked_rows(top: torch.Tensor) -> torch.Tensor:
    """(S,) bool: which of the streams whose highest layer's boundaries are `top` (S, P) are locked."""
    tail = top[:, -LOCK_TAIL:].double()
    return tail.mean(dim=1) > LOCK_RATE


ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class LockWatch:
    """Keeps, per stream, the highest layer's boundaries of the last LOCK_TAIL steps and the summed loss, as the
    batches of a pass go by. Nothing is read back from the device until `result`."""

    def __init__(self) -> None:
        self.tail: torch.Tensor | None = None  # (S, <= LOCK_TAIL)
        self.nll: torch.Tensor | None = None  # (S,) float64
        self.steps = 0  # steps per stream so far
        self.layer = 0  # the highest boundary layer, 1-based

    def add(self, boundaries: torch.Tensor, losses: torch.Tensor) -> None:
        """boundaries (S, T, L-1) and per-symbol losses (S, T) of the next T steps of every stream. Both may be
        buffers that the next batch overwrites (a replayed CUDA graph's): what is kept is copied."""
        if boundaries.shape[-1] == 0:  # an LSTM, or an HM-LSTM of one layer: nothing can lock
            return
        self.layer = boundaries.shape[-1]
        top = boundaries[..., -1]  # (S, T)
        joined = top if self.tail is None else torch.cat([self.tail, top], dim=1)
        self.tail = joined[:, -LOCK_TAIL:].clone()
        sums = losses.double().sum(dim=1)  # (S,)
        self.nll = sums if self.nll is None else self.nll + sums
        self.steps += top.shape[1]

    def result(self, reduce_sum: ReduceSum | None = None) -> Locks:
        """The locks over every stream so far; `reduce_sum` adds the counts of several processes."""
        if self.tail is None or self.nll is None:  # no boundaries
            return Locks(streams=0, locked=0, layer=0, tokens=0, nll=0.0)
        locked = locked_rows(self.tail)  # (S,)
        numbers = torch.stack([
            torch.tensor(float(len(locked)), dtype=torch.float64, device=self.nll.device),
            locked.double().sum(),
            locked.double().sum() * self.steps,
            (self.nll * locked.double()).sum(),
        ])  # fmt: skip
        if reduce_sum is not None:
            numbers = reduce_sum(numbers)
        streams, count, tokens, nll = numbers.tolist()
        return Locks(streams=int(streams), locked=int(count), layer=self.layer, tokens=int(tokens), nll=nll)
