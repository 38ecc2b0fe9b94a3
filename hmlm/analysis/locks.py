"""Locked streams: a boundary layer that fires on every step and never stops.

An HM-LSTM can have a second, degenerate regime besides the one it learned. From the zero state the highest
boundary detector sits on its threshold (every term but its bias is zero). Once it fires, the next step is a FLUSH,
which takes the top-down input of the layer above; that layer is young (its cell has barely grown), a state that
training never met, and its top-down input can push the detector to fire again. Firing on every step, the layer
keeps no memory (every step flushes it) and updates the layer above on every step, which keeps that layer young:
a fixed point that the stream never leaves, reading at several bits per character. Training meets the zero state
only at step 0 unless `train.reset_every` restarts streams, while evaluation and sampling start from it every time
(docs/locked-streams.md measures all of this).

A stream is *locked* when its highest boundary layer fires on more than `LOCK_RATE` of its last `LOCK_TAIL` steps
(all its steps when it is shorter). Only the highest layer is judged: a lower layer can legitimately fire on most
symbols (the paper's models fire layer 1 on 60-85% of them), while the highest one closes the longest segments.

`LockWatch` follows the streams of an evaluation (or a sample) batch by batch, from what that pass computes anyway
(each step's boundaries and each symbol's loss), so finding the locks costs no second pass. `fresh_starts` reads
the same streams from the zero state and from a warm one, the check that a model copes with fresh starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hmlm.graphs import eval_forward
from hmlm.model import CharLM, HMLSTMState

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
    rows: list[bool] = field(default_factory=list)  # per stream of this process: locked

    @property
    def bpc(self) -> float | None:
        """Bits per character on the locked streams alone; None when none is locked."""
        return self.nll / self.tokens / math.log(2) if self.tokens else None

    def warning(self) -> str | None:
        """One line for the user where a stream locked, else None."""
        if not self.locked:
            return None
        return (f"warning: {self.locked} of {self.streams} streams locked: layer {self.layer} fires on more than "
                f"{LOCK_RATE:.0%} of their last {LOCK_TAIL} steps, keeping no memory ({self.bpc:.2f} bpc on them); "
                f"a trained model that does this never learned to start from the zero state: train it with "
                f"train.reset_every (e.g. 50) so that training meets fresh starts")  # fmt: skip


def locked_rows(top: torch.Tensor) -> torch.Tensor:
    """(S,) bool: which of the streams whose highest layer's boundaries are `top` (S, P) are locked."""
    tail = top[:, -LOCK_TAIL:].double()
    return tail.mean(dim=1) > LOCK_RATE


ReduceSum = Callable[[torch.Tensor], torch.Tensor]


class LockWatch:
    """Keeps, per stream, the boundaries of the last LOCK_TAIL steps and the summed loss, as the batches of a pass
    go by. Nothing is read back from the device until `result`."""

    def __init__(self) -> None:
        self.tail: torch.Tensor | None = None  # (S, <= LOCK_TAIL, L-1)
        self.nll: torch.Tensor | None = None  # (S,) float64
        self.steps = 0  # steps per stream so far
        self.layer = 0  # the highest boundary layer, 1-based

    def add(self, boundaries: torch.Tensor, losses: torch.Tensor) -> None:
        """boundaries (S, T, L-1) and per-symbol losses (S, T) of the next T steps of every stream. Both may be
        buffers that the next batch overwrites (a replayed CUDA graph's): what is kept is copied."""
        if boundaries.shape[-1] == 0:  # an LSTM, or an HM-LSTM of one layer: nothing can lock
            return
        self.layer = boundaries.shape[-1]
        joined = boundaries if self.tail is None else torch.cat([self.tail, boundaries], dim=1)
        self.tail = joined[:, -LOCK_TAIL:].clone()  # (S, <= LOCK_TAIL, L-1)
        sums = losses.double().sum(dim=1)  # (S,)
        self.nll = sums if self.nll is None else self.nll + sums
        self.steps += boundaries.shape[1]

    def tail_rates(self) -> torch.Tensor:
        """(S, L-1): each stream's firing rate per layer over its last LOCK_TAIL steps."""
        assert self.tail is not None
        return self.tail.double().mean(dim=1)

    def result(self, reduce_sum: ReduceSum | None = None) -> Locks:
        """The locks over every stream so far; `reduce_sum` adds the counts of several processes."""
        if self.tail is None or self.nll is None:  # no boundaries
            return Locks(streams=0, locked=0, layer=0, tokens=0, nll=0.0)
        locked = locked_rows(self.tail[..., -1])  # (S,)
        numbers = torch.stack([
            torch.tensor(float(len(locked)), dtype=torch.float64, device=self.nll.device),
            locked.double().sum(),
            locked.double().sum() * self.steps,
            (self.nll * locked.double()).sum(),
        ])  # fmt: skip
        if reduce_sum is not None:
            numbers = reduce_sum(numbers)
        streams, count, tokens, nll = numbers.tolist()
        return Locks(streams=int(streams), locked=int(count), layer=self.layer, tokens=int(tokens), nll=nll,
                     rows=locked.tolist())  # fmt: skip


@dataclass
class FreshStarts:
    """The same streams read from the zero state (as evaluation reads them) and from a warm state."""

    zero_bpc: float
    warm_bpc: float
    zero: Locks
    warm: Locks


@torch.no_grad()
def fresh_starts(model: CharLM, tokens: np.ndarray, streams: int = 64, symbols: int = 64_000,
                 seq_len: int = 100) -> FreshStarts:  # fmt: skip
    """Cut the first `symbols` of `tokens` into `streams` contiguous streams and read them twice: from the zero
    state, and with every stream starting from the state in which the first pass left its first stream that did not
    lock (a warm state: the model has been reading text for a while). A model that copes with fresh starts locks no
    stream and reads both alike."""
    model.eval()
    device = next(model.parameters()).device
    n = min(symbols, len(tokens) - 1) // streams * streams
    data = torch.from_numpy(np.asarray(tokens[: n + 1], dtype=np.int64)).to(device)
    x, y = data[:n].view(streams, -1), data[1 : n + 1].view(streams, -1)  # (S, P)
    zero_bpc, zero, final = _read(model, x, y, None, seq_len)
    donor = next((row for row, locked in enumerate(zero.rows) if not locked), 0)  # a stream that did not lock
    warm_state = HMLSTMState(*[[t[donor : donor + 1].expand_as(t).clone() for t in part] for part in final])
    warm_bpc, warm, _ = _read(model, x, y, warm_state, seq_len)
    return FreshStarts(zero_bpc, warm_bpc, zero, warm)


def _read(model: CharLM, x: Tensor, y: Tensor, state: HMLSTMState | None, seq_len: int
          ) -> tuple[float, Locks, HMLSTMState]:  # fmt: skip
    """BPC and locks of streams x, y (S, P) read as evaluation reads batches, from `state`; the final state."""
    watch = LockWatch()
    nll = 0.0
    for start in range(0, x.shape[1], seq_len):
        batch = eval_forward(model, x[:, start : start + seq_len], y[:, start : start + seq_len], state, None)
        state = batch.state
        watch.add(batch.boundaries, batch.losses)
        nll += batch.nll.item()
    assert state is not None
    return nll / y.numel() / math.log(2), watch.result(), state
