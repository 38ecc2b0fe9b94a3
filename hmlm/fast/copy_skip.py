"""Inference that skips COPY: with gradients off, a layer step computes only what its outcome needs.

Layer l COPIES at step t when z^l_{t-1} = 0 and z^{l-1}_t = 0 (layer 1 never copies: z^0 = 1). Its h, c stay
and its z is 0, whatever the gates: the blend of hmlm/fast/ multiplies them by exactly 0. Training needs those
gates (the straight-through gradient reaches z through the choice of operation); evaluation and sampling do not,
and in a trained model most upper-layer steps copy. So, on the CPU and without gradients:

- One stream (sampling, `hmlm boundaries --text`): a layer that copies skips its matmul and its elementwise
  kernel entirely; h and c are copied, z set to 0.
- A batch: a layer step computes only its rows that do not copy: they are gathered, computed by the fast path's own
  matmul and cell step, and scattered back; the rows that copy get h_{t-1}, c_{t-1}, 0. The gathered rows are
  padded to a multiple of ROW_BLOCK (with rows that copy: computing them gives the copy exactly), which keeps
  MKL's matmul of every row bitwise the same as in the full batch (measured on the development machine's AMD
  EPYC, float32 and float64, one and two threads; elsewhere a row may differ by rounding).
  Where most rows compute (more than a fraction that grows with the size of the step, GATHER_FRACTIONS), or the
  layer steps are small, gathering costs more than the rows saved: the step runs on the full batch as before
  (forward.layer_step), without even looking at the boundaries.
- Sampling (the `Stepper` of hmlm/analysis/stepper.py): one symbol at a time through buffers made once, with the
  output module's per-layer projections W^e_l h^l kept from one step to the next and recomputed only for the
  layers whose h changed.

Two things every call without gradient on the CPU gets, skipping or not, so that both paths compute alike:
layer 1's input projection is looked up in a table of every symbol's (`input_table`, hmlm/model/charlm.py) instead
of a matmul over the embedded tokens, and at large sizes the gates' matmuls run on oneDNN (forward.ONEDNN_MIN_WEIGHT).

Not used (the step runs as forward.layer_step on every row):
- on CUDA: deciding which rows compute needs the boundaries on the host at every layer step, a device
  synchronization that costs more than the work saved, and a GPU's matmul takes no less time for fewer rows;
- with HMLM_SKIP_COPY=0 (for comparison: this is the path without skipping, today's arithmetic);
- for boundaries drawn at random in training mode (`sample` with model.train()): the draws of the rows that copy
  would be left out and every later draw would change.

The seed's cell (model.cell: seed) opens a boundary on a COPY step too, from zhat = U_z h_{t-1} alone (hmlm/cell.py).
Its h does not change while it copies, so neither does that zhat: the first COPY after a step that computed must
compute (its h, c come out unchanged; its z may open), and the COPY steps after it give z = 0 again, as the first
one did (had it opened, the layer would have flushed). So a row copies without computing only where it copied at
the step before as well; a call starts with every row as if it had computed (its state comes from outside).

The results equal the path without skipping (tests/test_inference.py): values in float64; in float32, the same
boundaries, BPC and sampled text.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from hmlm.fast import forward
from hmlm.fast.forward import StepWeights
from hmlm.fast.kernels import LayerNormParams
from hmlm.fast.tape import LayerTape, Plan, TapeCache

ROW_BLOCK = 4  # gathered rows are padded to a multiple of this (MKL's row blocking; see the module docstring)

# When a batch's layer step gathers its computing rows: when they are at most a fraction of the batch, and only
# where the step's matmul is large (B * K * R multiply-adds). Gathering has costs of its own: ~13 more torch
# calls per layer step, and the whole weight is still streamed from memory for however few rows, so at small
# sizes fewer rows take hardly less time. Measured on the 2-core development machine (one thread, heavily shared,
# so +-10%): the whole no-grad forward of a fresh model (boundary rates ~0.5: layer 2 copies ~30-43% of rows,
# layer 3 ~70-78%), batch B x 100, gathering up to 90% against not skipping, min of 8 interleaved runs:
#   3x128 (layer steps of 6-13M multiply-adds): B 32 1.19x the time, B 64 1.07x  -> no skipping below 15M
#   3x256 (17-50M): B 32 0.91x, B 64 0.84x;  a trained 3x256 model (copies 55% / 93%), B 64: 0.75x
# and timing one layer step gathered against the full step at 3x256 and 3x512, B 64: it pays up to ~85% of the
# rows at 3x256 and ~90% at 3x512. Below the size threshold nobody even looks at the boundaries (a few numpy
# calls per layer step): the batch runs exactly as without skipping.
GATHER_FRACTIONS = ((50e6, 0.9), (15e6, 0.8), (0.0, 0.0))  # (at least this many multiply-adds, largest fraction)
GATHER_FRACTION: float | None = None  # overrides the table (tests: 1.0 gathers whatever the fraction)


def gather_fraction(rows: int, K: int, R: int) -> float:
    """The largest fraction of the batch's rows that a layer step (a (rows, K) x (K, R) matmul) gathers rather
    than running on every row; 0: it never looks."""
    if GATHER_FRACTION is not None:
        return GATHER_FRACTION
    return next(fraction for least, fraction in GATHER_FRACTIONS if rows * K * R >= least)


def step_sizes(plan: Plan, layer: int) -> tuple[int, int]:
    """K and R of a layer step's matmul: [below | rec | above] inputs, [gates | zhat] outputs."""
    L, H = plan.num_layers, plan.hidden_sizes[layer]
    above = plan.hidden_sizes[layer + 1] if layer < L - 1 else 0
    return plan.below_sizes[layer] + H + above, 4 * H + (1 if layer < L - 1 else 0)


def enabled() -> bool:
    """HMLM_SKIP_COPY=0 turns skipping off (for comparison)."""
    return os.environ.get("HMLM_SKIP_COPY", "1") != "0"


NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)  # the boundaries are read on the host through numpy


def skips(plan: Plan, device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether a no-gradient call of this plan on this device, with a state of this dtype, skips COPY steps (see
    the module docstring)."""
    random_draws = plan.mode == "sample" and plan.training
    usable = device.type == "cpu" and dtype in NUMPY_DTYPES and plan.num_layers > 1
    return enabled() and usable and not random_draws


# --- What was skipped: counted as it happens, for `hmlm bench --run` ----------------------------------------------


@dataclass
class SkipCounts:
    """Per layer: rows (stream-steps) seen, those whose boundaries were checked (all of them, except where a batch
    is too small for skipping to pay: there nobody looks), those that COPY among them, and those whose work was
    skipped (fewer than the copies where a batch ran the full step or padded its gathered rows)."""

    rows: list[int] = field(default_factory=list)
    checked: list[int] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def add(self, layer: int, rows: int, checked: int, copies: int, skipped: int) -> None:
        while len(self.rows) <= layer:
            self.rows.append(0), self.checked.append(0), self.copies.append(0), self.skipped.append(0)
        self.rows[layer] += rows
        self.checked[layer] += checked
        self.copies[layer] += copies
        self.skipped[layer] += skipped

    def reset(self) -> None:
        self.rows, self.checked, self.copies, self.skipped = [], [], [], []

    def fractions(self) -> dict[str, list[float | None]]:
        """Per layer (layer 1 included: it never copies): the fraction of checked rows that copy (None where none
        was checked), and of all rows skipped."""
        return {
            "copy": [c / n if n else None for c, n in zip(self.copies, self.checked, strict=True)],
            "skipped": [s / r if r else 0.0 for s, r in zip(self.skipped, self.rows, strict=True)],
        }


COUNTS = SkipCounts()


# --- A sequence (evaluation, boundaries): a layer step that skips what copies --------------------------------------


class SubBatch:
    """The buffers of a layer step over M gathered rows: a one-step tape of M rows (LayerTape) whose h_{t-1}
    is the h_prev part of its matmul input (one gather fills both), and z below."""

    def __init__(self, plan: Plan, layer: int, M: int, like: Tensor):
        self.tape = LayerTape(plan, layer, M, 1, like.device, like.dtype, save=False)
        self.Z = torch.zeros(2, M, plan.num_layers, device=like.device, dtype=like.dtype)
        self.tape.attach(self.Z)
        self.tape.h_t = [self.tape.x_rec_t[0], self.tape.h_t[1]]
        self.z_prev, self.z_new = self.tape.z_t[0].numpy(), self.tape.z_t[1].numpy()  # (M, 1) views
        self.z_below = torch.empty(M, 1, device=like.device, dtype=like.dtype)
        self.ones = torch.ones(M, 1, device=like.device, dtype=like.dtype)


class SkippingStep:
    """forward.layer_step's replacement in a call without gradient (same signature): a layer that copies on every
    row is copied, one whose computing rows are few enough computes only those, and any other runs as before."""

    def __init__(self):
        self.subs: dict[tuple[int, int], SubBatch] = {}  # (layer, rows) -> buffers, kept across calls
        self.fractions: dict[tuple[int, int], float] = {}  # (layer, rows) -> gather_fraction
        self.copied: dict[int, np.ndarray] = {}  # layer -> (B, 1) rows that copied at the step before (cell: seed)

    def __call__(
        self, plan: Plan, tape: LayerTape, below: LayerTape | None, above: LayerTape | None,
        t: int, k: int, base: Tensor | None, w_t: StepWeights,
        ln: LayerNormParams | None, ones: Tensor,
    ) -> None:  # fmt: skip
        B = ones.shape[0]
        if below is None or (B > 1 and not self.fraction(plan, tape.layer, B)):  # layer 1 never copies
            COUNTS.add(tape.layer, B, B if below is None else 0, 0, 0)
            forward.layer_step(plan, tape, below, above, t, k, base, w_t, ln, ones)
            return
        z_prev, z_below = tape.z_t[t].numpy(), below.z_t[t + 1].numpy()  # (B, 1) views of the boundaries
        computes = z_prev + z_below  # (B, 1): 0 exactly where both are (z >= 0), where the row copies
        if plan.seed:  # a COPY computes unless the row copied at the step before too (module docstring)
            copied = self.copied.get(tape.layer)
            if t == 0 or copied is None or copied.shape[0] != B:
                copied = self.copied[tape.layer] = np.zeros((B, 1), dtype=bool)
            computes = computes + ~copied
            np.equal(z_prev + z_below, 0, out=copied)
        if B == 1:
            copies = z_prev[0, 0] == 0 and z_below[0, 0] == 0
            skipped = computes[0, 0] == 0
            COUNTS.add(tape.layer, 1, 1, int(copies), int(skipped))
            if skipped:
                copy_step(tape, t)
            else:
                forward.layer_step(plan, tape, below, above, t, k, base, w_t, ln, ones)
            return
        rows = np.flatnonzero(computes)
        M = len(rows)
        copies = int(copied.sum()) if plan.seed else B - M
        padded = -(-M // ROW_BLOCK) * ROW_BLOCK
        if M == B or padded > self.fraction(plan, tape.layer, B) * B:
            COUNTS.add(tape.layer, B, B, copies, 0)
            forward.layer_step(plan, tape, below, above, t, k, base, w_t, ln, ones)
        elif M == 0:
            COUNTS.add(tape.layer, B, B, B, B)
            copy_step(tape, t)
        else:
            COUNTS.add(tape.layer, B, B, copies, B - padded)
            if padded > M:  # pad with rows that copy: computed, they give the copy exactly
                rows = np.concatenate([rows, np.flatnonzero(computes == 0)[: padded - M]])
            self.gathered_step(plan, tape, below, above, t, base, w_t, ln, rows, z_prev, z_below)

    def fraction(self, plan: Plan, layer: int, rows: int) -> float:
        """gather_fraction of this layer's step, worked out once per batch size."""
        key = (layer, rows)
        if GATHER_FRACTION is not None or key not in self.fractions:
            self.fractions[key] = gather_fraction(rows, *step_sizes(plan, layer))
        return self.fractions[key]

    def gathered_step(
        self, plan: Plan, tape: LayerTape, below: LayerTape, above: LayerTape | None, t: int,
        base: Tensor | None, w_t: StepWeights, ln: LayerNormParams | None,
        rows: np.ndarray, z_prev: np.ndarray, z_below: np.ndarray,
    ) -> None:  # fmt: skip
        """Gather the rows, run the fast path's matmul and cell step on them as a batch of their own, scatter back."""
        key = (tape.layer, len(rows))
        sub = self.subs.get(key)
        if sub is None:
            sub = self.subs[key] = SubBatch(plan, tape.layer, len(rows), tape.h_t[t])
        s = sub.tape
        index = torch.from_numpy(rows)
        # The step's state and masked inputs [z_below h_below | h_prev | z_prev h_above], as layer_step makes them.
        sub.z_prev[:] = z_prev[rows]
        sub.z_below.numpy()[:] = z_below[rows]
        torch.index_select(tape.h_t[t], 0, index, out=s.h_t[0])  # (the h_prev part of the matmul input)
        torch.index_select(tape.c_t[t], 0, index, out=s.c_t[0])
        torch.index_select(below.h_t[t + 1], 0, index, out=s.x_below_t[0]).mul_(sub.z_below)
        if above is not None:
            torch.index_select(above.h_t[t], 0, index, out=s.x_above_t[0]).mul_(s.z_t[0])
        forward.matmul_add(base, s.x_t[0], w_t, out=s.pre_t[0])
        # The plan's kernel backend, as layer_step runs it: cell_step calls kernels.load(plan.kernels), C++, torch
        # ops, or Triton (on the CPU only under HMLM_KERNELS=triton, through the interpreter:
        # tests/test_inference.py). On CUDA nothing is skipped, so Triton's usual home never comes here.
        forward.cell_step(plan, s, below, above, 0, 0, ln, sub.z_below)
        # Every row copies, then the computed rows are written over.
        tape.h_t[t + 1].copy_(tape.h_t[t])
        tape.c_t[t + 1].copy_(tape.c_t[t])
        tape.h_t[t + 1].index_copy_(0, index, s.h_t[1])
        tape.c_t[t + 1].index_copy_(0, index, s.c_t[1])
        z_new = tape.z_t[t + 1].numpy()
        z_new[:] = 0
        z_new[rows] = sub.z_new


def copy_step(tape: LayerTape, t: int) -> None:
    """COPY on every row: h_t = h_{t-1}, c_t = c_{t-1}, z_t = 0."""
    tape.h_t[t + 1].copy_(tape.h_t[t])
    tape.c_t[t + 1].copy_(tape.c_t[t])
    tape.z_t[t + 1].zero_()


SKIPPERS = TapeCache()  # SkippingSteps (their gathered-row buffers), kept like the fast path's tapes (tape.TAPES)


NOT_SKIPPING = contextlib.nullcontext()  # (reusable: entering it costs less than a generator-based context)


def used(plan: Plan, device: torch.device, batch: int, dtype: torch.dtype) -> bool:
    """Whether a call of fast.run with this plan, batch and state dtype skips (see the module docstring)."""
    if not enabled() or torch.is_grad_enabled() or not skips(plan, device, dtype):  # the cheapest checks first
        return False
    # A batch too small for skipping to pay in any layer runs exactly the path without it.
    return batch == 1 or any(gather_fraction(batch, *step_sizes(plan, layer)) for layer in range(1, plan.num_layers))


def skipping(plan: Plan, device: torch.device, batch: int, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """The layer step for a call of fast.run (a state of this dtype), as a context: a SkippingStep where skipping
    is used (it only runs without gradient), else None (forward.layer_step)."""
    return _skipping((plan, batch, device)) if used(plan, device, batch, dtype) else NOT_SKIPPING


@contextlib.contextmanager
def _skipping(key: tuple) -> Iterator[SkippingStep]:
    step = SKIPPERS.take(key) or SkippingStep()
    try:
        yield step
    finally:
        SKIPPERS.give(key, step)
