"""The training step captured once as a CUDA graph and replayed (`train.cuda_graph`). Evaluation's captured forward,
and what both share (static inputs, the check of a first replay), is in hmlm/graphs.py.

Why: the fast path's step is thousands of small kernels (a few dozen per layer and time step, forward and
backward). Launched one by one from Python they cost more than they compute at the paper's shapes; a graph replay
launches all of them with one call. What a replay needs, and how this module provides it:

- Static memory. A graph replays the kernels on the addresses it captured, so the step reads and writes buffers
  that live as long as the graph: the batch (x, y), the slope (a 0-dim tensor: the model reads it on the device,
  so a new slope needs no new graph), the carried recurrent state (the captured step copies the new state into the
  same buffers at its end), and the results (hmlm/training/window.py's StepResult: loss, gradient norm, a finite
  flag, the boundary counts), all on the device: nothing in the step waits for the host. The next replay overwrites the
  results; the Trainer's LogWindow adds them into its own sums before that.
- One shape. A graph holds the shapes it was captured with. `StreamBatcher` hands out full batches of
  (batch_size, seq_len) and, at the end of every epoch, one shorter batch: that one runs eagerly (the Trainer's
  own step, on the same carried state), so no data is dropped.
- Warm-up. Before capture the step runs a few times on a side stream (cuBLAS handles, autograd's buffers, and
  Adam's state must exist before capture), and capture uses that same stream. Warm-up steps change the weights,
  Adam's moments and the carried state: all of it is copied before and put back in place after (the addresses
  stay, which the graph needs), so training goes on exactly where it was.
- The optimizer. Adam runs with `capturable=True` (its step count lives on the device). The learning rate is a
  number baked into the captured kernels; when it changes (the plateau scheduler divides it) the step is captured
  again with the new value. That happens a few times per run, and keeps the learning rate a plain number in the
  optimizer and in checkpoints. (`set_capturable` moves Adam's step counts where the flag wants them, so a
  checkpoint moves between graph and eager runs, and between CUDA and the CPU.)
- Checking. With `auto` the first replay is compared with an eager step from the same weights on the same batch
  (loss and gradient norm within `TOLERANCE`); on a mismatch, or if capture fails, training goes on eagerly after
  one warning line that says why. `on` skips the check and turns a failure into an error; `off` never captures.
  The CPU ignores `auto` and refuses `on`.
- A non-finite step. The captured step cannot look at its loss without waiting for the device, so the captured
  Adam has already applied a non-finite step (as the Trainer's eager step has too: neither reads anything back).
  The finite flag goes into the LogWindow, whose next check (at most `log_every` steps later, and always before a
  checkpoint is written) stops the run with one error; the last checkpoint, the last good one, is untouched.

Not done: the wavefront. Layer 1 at step t+1 and layer 3 at step t do not depend on each other, so two streams
inside the graph could run 2T+2 serial layer-steps instead of 3T; not implemented, not measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlm.errors import UserError
from hmlm.graphs import (
    StaticInputs,
    Warn,
    autocast_context,
    describe,
    mismatch,
    warn_stderr,
)
from hmlm.model import HMLSTMState
from hmlm.training.window import StepResult

MODES = ("auto", "on", "off")
WARMUP_STEPS = 3  # eager steps on the capture stream before capture (the PyTorch docs' whole-network example)


def set_capturable(optimizer: torch.optim.Optimizer, on: bool) -> None:
    """Switch Adam's `capturable` flag and move its step counts to match: on the parameter's device (as float32)
    when on, on the CPU when off (where non-capturable Adam keeps them). A checkpoint holds the flag of the run that
    wrote it; the Trainer calls this after loading one, so it resumes under either setting and on either device."""
    for group in optimizer.param_groups:
        group["capturable"] = on
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and torch.is_tensor(state.get("step")):
                step = state["step"]
                state["step"] = step.to(p.device, torch.float32) if on else step.detach().to("cpu", torch.float32)


def resolve_mode(mode: str, device: torch.device, distributed: bool, warn: Warn) -> bool:
    """Whether to capture the training step, for `train.cuda_graph` = mode. UserError where `on` cannot be."""
    if mode not in MODES:
        raise UserError(f"train.cuda_graph must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off":
        return False
    if device.type != "cuda":
        if mode == "on":
            raise UserError(
                f"train.cuda_graph is on but training runs on {device.type}: CUDA graphs need CUDA; "
                "use train.cuda_graph=auto or off"
            )
        return False  # auto: the CPU has nothing to capture
    if distributed:  # DDP's gradient all-reduce inside a captured step is not supported here
        if mode == "on":
            raise UserError("train.cuda_graph is on but this is a torchrun run: use train.cuda_graph=auto or off")
        warn("warning: train.cuda_graph auto: not with several processes (torchrun); training without CUDA graphs")
        return False
    return True


# --- Copies of what a step changes, put back in place -----------------------------------------------------------


def get_rng_state(device: torch.device) -> Tensor:
    """The generator that `sample` boundaries draw from on this device."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class Snapshot:
    """Parameters, optimizer state, carried state and the device's random generator, copied now and written back by
    `restore` into the same tensors (a captured graph knows them by address). Optimizer state that does not exist
    yet (a fresh Adam) is zeroed on restore, which is how Adam starts it. The generator comes back too, so that a
    warm-up, a capture or a checked replay that is undone leaves `sample` boundaries drawing what they would have
    drawn without it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: HMLSTMState):
        self.model, self.optimizer = model, optimizer
        self.tensors = [p.data for p in model.parameters()] + [t for part in state for t in part]
        self.tensors += [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        self.copies = [t.detach().clone() for t in self.tensors]
        self.fresh = [p for p in model.parameters() if not optimizer.state.get(p)]
        self.device = next(model.parameters()).device
        self.rng = get_rng_state(self.device)

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, copy in zip(self.tensors, self.copies, strict=True):
            tensor.copy_(copy)
        for p in self.fresh:
            for value in self.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value):
                    value.zero_()
        set_rng_state(self.rng, self.device)


# --- The step on static buffers ---------------------------------------------------------------------------------


class StaticStep(StaticInputs):
    """One training step that reads and writes only buffers it owns, so that it can be captured and replayed."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
        autocast: torch.dtype | None,
        batch_shape: tuple[int, int],
        device: torch.device,
    ):
        super().__init__(model, batch_shape, device)
        self.model, self.optimizer, self.grad_clip, self.autocast = model, optimizer, grad_clip, autocast
        self.slope = torch.ones((), dtype=self.dtype, device=device)
        self.slope_value = 1.0

    def load_step(self, x: Tensor, y: Tensor, slope: float, state: HMLSTMState | None) -> None:
        """Copy a batch, the slope and (unless it is already there) the carried state into the buffers."""
        self.load(x, y, state)
        if slope != self.slope_value:  # a fill is a kernel launch: skip it while the slope stays
            self.slope.fill_(slope)
            self.slope_value = slope

    def compute(self) -> StepResult:
        """Forward, loss, backward, gradient clipping, Adam, and the new state written over the old. The gradients
        must be None or zero (they are then written, or accumulated into zeros)."""
        with autocast_context(self.device, self.autocast):
            out = self.model(self.x, self.state, self.slope)
        logits = out.logits if out.logits.dtype == torch.float64 else out.logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), self.y.flatten())
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)  # no host sync
        self.optimizer.step()
        self.keep_state(out.state)  # truncated BPTT: the next step starts from these values, cut from the graph
        return StepResult.of(loss, grad_norm, out.boundaries)  # computed in the graph, into its output buffers

    def eager(self) -> StepResult:
        self.optimizer.zero_grad(set_to_none=False)  # zeros in place: captured gradients keep their memory
        return self.compute()


# --- How a step is replayed -------------------------------------------------------------------------------------


class CudaGraphReplay:
    """Captures a StaticStep as one CUDA graph (after warm-up on the capture stream) and replays it."""

    def __init__(self, step: StaticStep):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.result: StepResult | None = None
        self.stream = torch.cuda.Stream(step.device)

    def capture(self) -> None:
        step = self.step
        snapshot = Snapshot(step.model, step.optimizer, step.state)  # the generator too: for `sample` boundaries
        self.stream.wait_stream(torch.cuda.current_stream(step.device))
        with torch.cuda.stream(self.stream):
            for _ in range(WARMUP_STEPS):
                step.optimizer.zero_grad(set_to_none=True)
                step.compute()
        torch.cuda.current_stream(step.device).wait_stream(self.stream)
        snapshot.restore()
        # No gradients before capture: backward then allocates them from the graph's pool, and every replay writes
        # (not accumulates) them there.
        step.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=self.stream):
            self.result = step.compute()

    def replay(self) -> StepResult:
        assert self.graph is not None and self.result is not None
        self.graph.replay()
        return self.result


class EagerReplay:
    """The same protocol without CUDA: 'replay' runs the StaticStep eagerly. It is how the CPU tests check the
    buffer logic and the verify-and-fall-back decision; `perturb` lets a test inject a mismatch."""

    def __init__(self, step: StaticStep, perturb: float = 0.0):
        self.step, self.perturb = step, perturb

    def capture(self) -> None:
        pass

    def replay(self) -> StepResult:
        result = self.step.eager()
        if self.perturb:
            result.loss = result.loss * (1 + self.perturb)
        return result


class GraphTrainStep:
    """The Trainer's captured training step: one StaticStep and its graph for the full batches (`batch_shape`, or
    the first shape it is given), captured again when the learning rate changes.

    `step` returns (result, state): the StepResult on the device and the carried state to keep; or (None, state)
    when this step must run eagerly (a shorter batch, or graphs have been given up), with the state that step
    starts from."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        grad_clip: float,
        autocast: torch.dtype | None,
        device: torch.device,
        mode: str = "auto",
        warn: Warn = warn_stderr,
        replay_factory: Callable[[StaticStep], CudaGraphReplay | EagerReplay] = CudaGraphReplay,
        batch_shape: tuple[int, int] | None = None,
    ):
        self.model, self.optimizer, self.grad_clip, self.autocast = model, optimizer, grad_clip, autocast
        self.device, self.mode, self.warn, self.replay_factory = device, mode, warn, replay_factory
        self.batch_shape = batch_shape  # (streams, seq_len): a run resumed at its epoch's short batch starts there
        self.static: StaticStep | None = None
        self.replay: CudaGraphReplay | EagerReplay | None = None
        self.captured_lrs: tuple[float, ...] | None = None
        self.verified = mode != "auto"
        self.given_up: str | None = None  # why graphs are off for the rest of the run

    def step(self, x: Tensor, y: Tensor, slope: float, state: HMLSTMState | None):
        if self.given_up is not None:
            return None, state
        self.batch_shape = self.batch_shape or tuple(x.shape)
        if tuple(x.shape) != self.batch_shape:
            return None, state  # the epoch's shorter last batch: eager, from the carried state
        if self.static is None:
            self.static = StaticStep(self.model, self.optimizer, self.grad_clip, self.autocast, self.batch_shape,
                                     self.device)  # fmt: skip
        static = self.static
        static.load_step(x, y, slope, state)
        lrs = tuple(float(group["lr"]) for group in self.optimizer.param_groups)
        recapture = self.replay is None or lrs != self.captured_lrs
        if recapture and self.device.type == "cuda":
            set_capturable(self.optimizer, True)  # before the snapshot: it may move Adam's step counts
        # What to put back if capture or the check fails: warm-up and the checked replay change the weights, and
        # draw random numbers.
        snapshot = Snapshot(self.model, self.optimizer, static.state) if recapture or not self.verified else None
        try:
            if recapture:
                self.replay = None  # free the old graph first
                replay = self.replay_factory(static)
                replay.capture()
                self.replay, self.captured_lrs = replay, lrs
            if not self.verified:
                return self._verified_step(static, snapshot)
            return self.replay.replay(), static.state
        except Exception as error:  # a kernel that cannot be captured, out of memory in the graph's pool, ...
            if self.mode == "on":
                if snapshot is not None:
                    snapshot.restore()
                raise UserError(f"train.cuda_graph is on but capturing the training step failed: {describe(error)}; "
                                "use train.cuda_graph=auto or off") from None  # fmt: skip
            return self._give_up(f"capturing the training step failed: {describe(error)}", snapshot)

    def _verified_step(self, static: StaticStep, snapshot: Snapshot):
        """The first replay, checked against an eager step from the same weights, state and batch."""
        rng = get_rng_state(self.device)
        eager = static.eager()
        eager_values = (float(eager.loss), float(eager.grad_norm))  # one host read, once per run
        snapshot.restore()
        set_rng_state(rng, self.device)  # the same Bernoulli draws for `sample` boundaries as the eager step
        result = self.replay.replay()
        reason = mismatch(eager_values, (float(result.loss), float(result.grad_norm)), static.dtype)
        if reason is not None:
            return self._give_up(reason, snapshot)
        self.verified = True
        return result, static.state

    def _give_up(self, reason: str, snapshot: Snapshot | None):
        """Graphs off for the rest of the run: undo the warm-up, capture and replayed step (weights, optimizer,
        state and random generator), say why once, and let the caller run eagerly from the carried state."""
        if snapshot is not None:
            snapshot.restore()
        self.given_up = reason
        self.replay = None
        set_capturable(self.optimizer, False)
        self.optimizer.zero_grad(set_to_none=True)
        self.warn(f"warning: train.cuda_graph auto: {reason}; training without CUDA graphs")
        return None, self.static.state if self.static is not None else None


def trainer_step(
    mode: str, prior: bool, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
    autocast: torch.dtype | None, device: torch.device, distributed: bool, batch_shape: tuple[int, int], warn: Warn,
) -> GraphTrainStep | None:  # fmt: skip
    """The Trainer's captured step for `train.cuda_graph` = mode, or None where it trains eagerly. The graph computes
    the LM loss alone, so a run with the boundary prior (hmlm/model/prior.py) trains eagerly; UserError where the
    mode is on."""
    if not resolve_mode(mode, device, distributed, warn):
        return None
    if prior:
        if mode == "on":
            raise UserError("train.cuda_graph is on but the captured step has no boundary prior: "
                            "use train.cuda_graph=auto or off, or turn the prior off (prior.rates: [])")  # fmt: skip
        warn("warning: train.cuda_graph auto: not with the boundary prior; training without CUDA graphs")
        return None
    return GraphTrainStep(model, optimizer, grad_clip, autocast, device, mode, warn, batch_shape=batch_shape)
