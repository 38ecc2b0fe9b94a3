"""CUDA graphs of the model's calls, what training's captured step (hmlm/training/cuda_graph.py) and evaluation's
captured forward share: the static buffers a graph reads (a batch and the carried state), the check of a first
replay against an eager call, and evaluation's no-grad forward, eager or captured (`train.cuda_graph`: auto, on,
off). Why graphs, and what a replay needs: hmlm/training/cuda_graph.py's docstring."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlm.errors import UserError
from hmlm.model import HMLSTMState

# Relative tolerances of the first replay against an eager step: (loss, gradient norm). The replay runs the same
# kernels on the same numbers; what may differ is cuBLAS picking another algorithm under capture, and then a hard
# boundary whose zhat sits at rounding distance from 0 may flip, which moves the loss a little and the gradient
# norm (straight-through) more. In float64 nothing should differ beyond rounding.
TOLERANCE = {torch.float64: (1e-9, 1e-7), "default": (1e-3, 2e-2)}

Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mismatch(eager: tuple[float, float], replay: tuple[float, float], dtype: torch.dtype) -> str | None:
    """Why a replay's (loss, grad norm) disagrees with the eager step's, or None when within TOLERANCE."""
    tolerances = TOLERANCE.get(dtype, TOLERANCE["default"])
    for name, a, b, rtol in zip(("loss", "gradient norm"), eager, replay, tolerances, strict=True):
        if not (math.isfinite(a) and math.isfinite(b)):
            return f"the {name} is not finite (eager {a:.6g}, graph {b:.6g})"
        if abs(a - b) > rtol * max(abs(a), abs(b), 1e-12):
            return f"the first replay's {name} {b:.6g} differs from the eager step's {a:.6g} (tolerance {rtol:g})"
    return None


def describe(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# --- Static inputs ---------------------------------------------------------------------------------------------


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    # cache_enabled=False: autocast's cache of cast weights must not outlive a captured region (torch.cuda docs).
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext()


def copy_batch(dst: Tensor, src: Tensor) -> None:
    """dst <- src without waiting: a copy from pageable host memory would synchronize with the device first."""
    if dst.is_cuda and not src.is_cuda:
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)


class StaticInputs:
    """The buffers a captured graph reads: a batch (x, y) and the carried recurrent state."""

    def __init__(self, model: nn.Module, batch_shape: tuple[int, int], device: torch.device):
        self.batch_shape, self.device = batch_shape, device
        self.dtype = next(model.parameters()).dtype
        self.x = torch.zeros(batch_shape, dtype=torch.long, device=device)  # (B, T)
        self.y = torch.zeros(batch_shape, dtype=torch.long, device=device)  # (B, T)
        initial = model.initial_state(batch_shape[0], device)  # every layer's h, c (B, H_l) and z (B, 1)
        self.state = HMLSTMState(*([t.to(self.dtype) for t in part] for part in initial))

    @torch.no_grad()
    def load(self, x: Tensor, y: Tensor, state: HMLSTMState | None) -> None:
        """Copy a batch and (unless it is already there) the carried state into the buffers."""
        copy_batch(self.x, x)
        copy_batch(self.y, y)
        if state is not self.state:  # a new run or split (None: zeros), a resumed one, or after an eager step
            self.keep_state(state)

    @torch.no_grad()
    def keep_state(self, state: HMLSTMState | None) -> None:
        """Write `state` (None: zeros) over the state buffers."""
        for part, new in zip(self.state, state or [None] * len(self.state), strict=True):
            for buffer, value in zip(part, new or [None] * len(part), strict=True):
                buffer.zero_() if value is None else buffer.copy_(value)


# --- Evaluation: the no-grad forward --------------------------------------------------------------------------


@dataclass
class EvalBatch:
    """One batch of evaluation, on the device."""

    nll: Tensor  # () float64: summed cross entropy in nats
    boundary_sum: Tensor  # (L-1,) float64: boundaries summed over the batch
    boundaries: Tensor  # (B, T, L-1)
    losses: Tensor  # (B, T) float32: each prediction's cross entropy in nats (its surprisal)
    state: HMLSTMState  # the state to carry to the next batch


def eval_forward(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    state: HMLSTMState | None,
    autocast: torch.dtype | None,
    slope: float | Tensor = 1.0,
) -> EvalBatch:
    """The forward of one evaluation batch, eagerly (also what the captured graph runs, with the slope as a
    tensor: the same kernel variants as its warm-up, and the same in float64 as a number)."""
    with autocast_context(x.device, autocast):
        out = model(x, state, slope)
    losses = F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)  # (B, T)
    return EvalBatch(losses.sum().double(), out.boundaries.double().sum(dim=(0, 1)), out.boundaries, losses, out.state)


class EvalGraph(StaticInputs):
    """evaluate()'s no-grad forward for one batch shape, captured once (per evaluate call) and replayed."""

    def __init__(self, model: nn.Module, batch_shape: tuple[int, int], device: torch.device, autocast):
        super().__init__(model, batch_shape, device)
        self.model, self.autocast = model, autocast
        self.slope = torch.ones((), dtype=self.dtype, device=device)  # evaluation's slope, 1 (see eval_forward)
        self.out: EvalBatch | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _compute(self) -> EvalBatch:
        out = eval_forward(self.model, self.x, self.y, self.state, self.autocast, self.slope)
        self.keep_state(out.state)
        return EvalBatch(out.nll, out.boundary_sum, out.boundaries, out.losses, self.state)

    @torch.no_grad()
    def capture(self) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up; it changes only the state buffers, which `run` loads before each replay
                self._compute()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.out = self._compute()

    @torch.no_grad()
    def run(self, x: Tensor, y: Tensor, state: HMLSTMState | None) -> EvalBatch:
        self.load(x, y, state)
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out


def capture_eval(
    model: nn.Module,
    batch_shape: tuple[int, int],
    device: torch.device,
    autocast: torch.dtype | None,
    mode: str,
    first: tuple[Tensor, Tensor] | None = None,
    warn: Warn = warn_stderr,
) -> EvalGraph | None:
    """An EvalGraph for `mode` (train.cuda_graph), or None to evaluate eagerly. With `auto`, the replay of `first`
    (a batch) from a zero state is checked against the eager forward; a failure or mismatch gives one warning."""
    if mode == "off" or device.type != "cuda":
        return None
    try:
        graph = EvalGraph(model, batch_shape, device, autocast)
        graph.capture()
        if mode == "auto" and first is not None:
            x, y = (t.to(device) for t in first)
            with torch.no_grad():
                eager = float(eval_forward(model, x, y, None, autocast).nll)
            replayed = float(graph.run(x, y, None).nll)
            reason = mismatch((eager, 1.0), (replayed, 1.0), next(model.parameters()).dtype)
            if reason is not None:
                raise RuntimeError(reason)
        return graph
    except Exception as error:
        if mode == "on":
            raise UserError(f"train.cuda_graph is on but capturing evaluation failed: {describe(error)}") from None
        warn(f"warning: train.cuda_graph auto: capturing evaluation failed ({describe(error)}); evaluating eagerly")
        return None
