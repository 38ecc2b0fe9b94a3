"""The training loop: truncated BPTT over contiguous streams, evaluation and checkpoint cadence, exact resume.

Truncated backprop through time (as pytorch/examples word_language_model): the training split is cut into
`batch_size` contiguous streams; each step reads the next `seq_len` symbols of every stream, predicts each
next symbol, and backpropagates through those `seq_len` steps only. The recurrent state (h, c, z of every
layer) is carried to the next batch but detached there, so the model sees the whole history in its state while
the gradient stops at the batch edge.

The carried state runs on from one epoch into the next, so without restarts a stream starts from the zero state
only at step 0, while evaluation and sampling start every stream from zeros. An HM-LSTM trained that way can meet
a fresh start in a regime it never learned: some streams lock into their highest boundary layer firing on every
step, at 5 to 8 bits per character (docs/locked-streams.md). `train.reset_every: N` (50 by default) restarts each
stream from zeros every N steps (stream g at the steps s with (s + g N // B) % N == 0: spread over the steps), a
deterministic function of the step, so a resume repeats it.

The trainer knows the model only through `model(x, state, slope) -> (logits, boundaries, state, gates)`.
"""

from __future__ import annotations

import gc
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hmlm.config import Config
from hmlm.data import Dataset, StreamBatcher, open_dataset
from hmlm.devices import resolve_device, to_device
from hmlm.errors import UserError
from hmlm.model import CharLM, HMLSTMState
from hmlm.model.prior import boundary_prior
from hmlm.precision import apply_precision
from hmlm.training import rng
from hmlm.training.cuda_graph import GraphTrainStep, trainer_step
from hmlm.training.distributed import Process, barrier, init_process, shutdown
from hmlm.training.limits import check_not_finished, check_training, out_of_memory_in_training
from hmlm.training.log import LN2, RunLog
from hmlm.training.state import Schedule, checkpoint_dir, diverged, resolve_run, restore, save
from hmlm.training.validation import after_evaluation, validate
from hmlm.training.window import LogWindow, StepResult, WindowTotals


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    epoch: int
    best_valid_bpc: float
    stopped: str  # "finished", "max_steps", "max_time" or "interrupted"
    main_process: bool = True  # False in the other torchrun processes, which stay quiet


class StopFlag:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step, save a checkpoint and exit.
    A second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class Trainer:
    def __init__(self, config: Config, run_dir: Path, process: Process, device: torch.device, progress: bool):
        self.config, self.run_dir, self.process, self.device = config, run_dir, process, device
        self.progress = progress and process.is_main
        cfg = config.train
        self.dataset: Dataset = open_dataset(config.data.name, config.data.dir)
        self.vocab = self.dataset.vocab
        torch.manual_seed(cfg.seed)
        self.model = CharLM(len(self.vocab), config.model).to(device)
        rng.seed_process(cfg.seed, process.rank)  # the boundary: sample noise differs between processes
        if cfg.precision == "fp64":  # for checks that must agree to rounding, e.g. one process against several
            self.model.double()
        self.ddp = None
        if process.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        if cfg.batch_size % process.world_size:
            raise UserError(
                f"train.batch_size {cfg.batch_size} is the global batch and must divide by the {process.world_size} "
                f"processes: use a multiple of {process.world_size}, e.g. -s train.batch_size="
                f"{cfg.batch_size + process.world_size - cfg.batch_size % process.world_size}"
            )
        self.batcher = StreamBatcher(
            self.dataset.split("train"), cfg.batch_size, cfg.seq_len, process.rank, process.world_size
        )
        self.schedule = Schedule(lr=cfg.lr)
        self.state: HMLSTMState | None = None  # this process's streams; None = zeros
        apply_precision(cfg.precision, device)  # TF32 matmuls on CUDA under fp32 and bf16, not fp32-strict
        self.autocast = cfg.precision == "bf16" and device.type == "cuda"
        if cfg.precision == "bf16" and device.type != "cuda":
            tqdm.write("warning: train.precision bf16 autocasts on CUDA only; training in fp32 on the CPU")
        self.log = RunLog(run_dir, process)
        self.window = LogWindow(device)
        self.prior_terms: list[torch.Tensor] = []  # the boundary prior's per-layer terms at the last step
        # On CUDA the training step is captured once as a CUDA graph and replayed (train.cuda_graph,
        # hmlm/training/cuda_graph.py)
        self.graph_step: GraphTrainStep | None = trainer_step(
            cfg.cuda_graph, config.prior.enabled, self.model, self.optimizer, cfg.grad_clip,
            autocast=torch.bfloat16 if self.autocast else None, device=device, distributed=process.distributed,
            batch_shape=(self.batcher.streams, cfg.seq_len), warn=tqdm.write,
        )  # fmt: skip

    def train_step(self, x: torch.Tensor, y: torch.Tensor, slope: float) -> StepResult:
        """Forward, backward, clip, Adam, without reading anything back from the device."""
        self.restart_streams()
        if self.graph_step is not None:  # the captured step; it declines a shorter batch, and after a fallback
            result, self.state = self.graph_step.step(x, y, slope, self.state)
            if result is not None:  # in the graph's output buffers: the next replay overwrites them (LogWindow.add)
                return result
        x, y = to_device(x, self.device), to_device(y, self.device)  # (B, T)
        model = self.ddp or self.model
        cast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext()
        prior = self.config.prior
        prior_scale = prior.scale_at(self.schedule.step)  # 0: off at this step (prior.start), so not computed
        with cast:
            out = model(x, self.state, slope, with_zhat=prior_scale > 0)
        logits = out.logits if out.logits.dtype == torch.float64 else out.logits.float()  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())  # the LM loss alone: what BPC reports
        objective = loss
        if prior_scale > 0:  # a boundary-rate prior, added to what is minimized only (hmlm/model/prior.py)
            z0 = self.state.z if self.state is not None else None
            prior_term, self.prior_terms = boundary_prior(prior, out.zhat, out.boundaries, z0, slope, prior_scale,
                                                          self.config.model.cell)  # fmt: skip
            objective = loss + prior_term
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip)  # ()
        # Not checked here (that would wait for the device): a non-finite step is counted in the log window and
        # stops the run at the next check, before any checkpoint is written. The norm is of the gradients DDP
        # averaged, so a NaN on any process shows on all of them and they all stop at the same check.
        self.optimizer.step()
        self.state = out.state.detach()  # truncated BPTT: carry the values, cut the graph
        return StepResult.of(loss, grad_norm, out.boundaries)

    def restart_streams(self) -> None:
        """Zero the carried state of the streams that train.reset_every restarts before this step."""
        cfg = self.config.train
        rows = restarting_rows(self.schedule.step, cfg.reset_every, cfg.batch_size,
                               self.process.rank * self.batcher.streams, self.batcher.streams)  # fmt: skip
        if rows and self.state is not None:
            self.state = zero_rows(self.state, rows)

    def run(self, stop: StopFlag) -> TrainSummary:
        cfg, schedule = self.config.train, self.schedule
        self.log.open(schedule.step)
        # With only a time limit the number of steps is unknown: the bar then counts without a total.
        total = cfg.max_steps or (None if cfg.max_time else cfg.max_epochs * len(self.batcher))
        bar = tqdm(total=total, initial=schedule.step, disable=not self.progress, unit="step")
        chars_per_step = cfg.batch_size * cfg.seq_len
        started, stopped = time.monotonic() - schedule.elapsed, "finished"
        last_eval_step = schedule.step
        tick, tick_step = time.monotonic(), schedule.step
        self.model.train()
        while schedule.epoch < cfg.max_epochs and stopped == "finished":
            for x, y in self.batcher:
                slope = self.config.slope.at(schedule.step, schedule.epoch)
                self.window.add(self.train_step(x, y, slope))
                schedule.step += 1
                schedule.elapsed = time.monotonic() - started
                bar.update(1)
                logging = schedule.step % cfg.log_every == 0
                evaluating = schedule.step % cfg.eval_every == 0
                last = bool(cfg.max_steps) and schedule.step >= cfg.max_steps
                time_up = bool(cfg.max_time) and schedule.elapsed >= cfg.max_time
                # Clocks and signals differ between processes: under torchrun they are compared at checks only, so
                # that all processes stop at the same step. A process alone looks at them every step, for free.
                alone_stops = not self.process.distributed and (time_up or stop.requested)
                if not (logging or evaluating or last or self.batcher.position == 0 or alone_stops):
                    continue  # no check: nothing on this step waits for the device
                totals = self.check(stop.requested, time_up)
                if logging:
                    now = time.monotonic()
                    speed = chars_per_step * (schedule.step - tick_step) / max(now - tick, 1e-9)
                    tick, tick_step = now, schedule.step
                    self.log.train(totals, schedule, slope, speed, self.prior_terms, bar)
                if evaluating:
                    self.evaluate_and_save()
                    last_eval_step = schedule.step
                if last:
                    stopped = "max_steps"
                elif totals.time_up:
                    stopped = "max_time"
                if totals.stop:
                    stopped = "interrupted"
                if stopped != "finished":
                    break
            else:  # the epoch ran to its end
                schedule.epoch += 1
                if last_eval_step != schedule.step:  # not just evaluated by eval_every on the epoch's last step
                    self.evaluate_and_save()
                    last_eval_step = schedule.step
        bar.close()
        if stopped == "interrupted":
            save(self, "last")
            tqdm.write(f"interrupted at step {schedule.step}: saved {checkpoint_dir(self.run_dir) / 'last.pt'}; "
                       f"continue with `hmlm train --run-dir {self.run_dir} --resume`")  # fmt: skip
        elif last_eval_step != schedule.step:
            self.evaluate_and_save()
        self.log.close()
        best = schedule.best_valid_loss / LN2
        return TrainSummary(self.run_dir, schedule.step, schedule.epoch, best, stopped, self.process.is_main)

    def check(self, stop: bool, time_up: bool) -> WindowTotals:
        """Read the log window (the one wait for the device in the steps since the last check) and empty it.
        A non-finite step in it stops the run here, before anything is saved. By then Adam has applied that step
        and the ones after it (the eager step does not look before Adam, and the captured step,
        hmlm/training/cuda_graph.py, cannot), so the weights in memory are spoiled; the last checkpoint, written
        before them, is untouched."""
        totals = self.window.read(stop, time_up, self.process.distributed)
        self.window.reset(after_step=self.schedule.step)
        if totals.bad_steps or not math.isfinite(totals.loss):
            loss, norm = totals.means(self.process.world_size)
            steps = f"{totals.after_step + 1}-{totals.after_step + totals.steps}"
            raise diverged(
                f"the training loss became non-finite (mean {loss:.4g}, gradient norm {norm:.4g}) in steps {steps}",
                self.run_dir,
            )
        return totals

    def evaluate_and_save(self) -> None:
        cfg = self.config.train
        result = validate(self.model, self.dataset, cfg, self.device, self.process, self.autocast, self.progress)
        # The check before an evaluation reads the losses of the steps up to it, each computed before its own update:
        # an update that spoiled the weights at the last of them shows here first. Nothing is logged, sampled (its
        # probabilities would be NaN) or saved from such weights. Under torchrun every process has the same sum.
        if not math.isfinite(result.loss):
            raise diverged(f"the validation loss became non-finite at step {self.schedule.step}", self.run_dir)
        improved = after_evaluation(self.schedule, result.loss, cfg, self.optimizer, self.process.is_main)
        self.log.evaluation(result, improved, self.schedule, self.model, self.dataset, cfg)
        payload = save(self, "last")
        if improved:
            save(self, "best", payload)
        barrier()


def restarting_rows(step: int, every: int, batch_size: int, first: int, count: int) -> list[int]:
    """The local rows (global streams first .. first + count - 1 of batch_size) whose state starts again from zeros
    before step `step`: stream g at the steps s > 0 with (s + g * every // batch_size) % every == 0, so every stream
    restarts once in `every` steps and the restarts are spread evenly over those steps. every = 0: none."""
    if every <= 0 or step == 0:
        return []
    return [row for row in range(count) if (step + (first + row) * every // batch_size) % every == 0]


def zero_rows(state: HMLSTMState, rows: list[int]) -> HMLSTMState:
    """The state with h, c and z of the given rows (streams) set to zero, the initial state; a multiply on the
    state's device, so nothing waits for it."""
    keep = torch.ones(state.h[0].shape[0], 1, dtype=state.h[0].dtype)
    keep[rows] = 0
    keep = keep.to(state.h[0].device, non_blocking=True)  # (B, 1)
    return HMLSTMState(*[[t * keep.to(t.dtype) for t in part] for part in state])


def train(
    config: Config | None,
    run_dir: Path,
    resume: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> TrainSummary:
    """Train a model as `config` says, in `run_dir`; with `resume`, continue the run saved there."""
    config, payload = resolve_run(config, run_dir, resume, overrides or [])
    if payload is not None:  # before anything is written: a finished run stays as it is
        check_not_finished(config, payload["schedule"], run_dir)
    existed = run_dir.exists()
    process, device = init_process(resolve_device(config.train.device, "train.device"))
    trainer: Trainer | None = None
    finished = False
    try:
        # Split lengths and the memory estimate, before anything is allocated
        dataset = open_dataset(config.data.name, config.data.dir)
        plan = check_training(config, dataset, device, process.world_size)
        if process.is_main:
            tqdm.write(plan)
        with out_of_memory_in_training(config, run_dir, existed, resume):
            trainer = Trainer(config, run_dir, process, device, progress)
            if payload is not None:
                restore(trainer, payload)
            if process.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / "config.yaml").write_text(config.to_yaml())
            with StopFlag() as stop:
                summary = trainer.run(stop)
        finished = True
        return summary
    finally:
        # DistributedDataParallel keeps the process group alive: left to the interpreter's exit, gloo's threads can
        # be torn down mid-flight (an abort). Drop it first, then close the group together.
        trainer = None
        gc.collect()
        shutdown(together=finished)
