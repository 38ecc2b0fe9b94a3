"""What a checkpoint of a training run holds, and how a run starts from one.

A checkpoint is everything an exact resume needs, as tensors and plain values only (so that torch.load can stay
weights-only): the config, the vocabulary, the weights, Adam's state, the `Schedule`, the batcher's position, the
carried state of every stream, and every process's random generators. A resume continues with the very batches,
draws and learning rate the run would have had without the stop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from hmlm.checkpoint import FORMAT_VERSION, load_checkpoint, save_checkpoint, state_from_lists, state_to_lists
from hmlm.config import Config, apply_override, from_saved, load_config
from hmlm.data import StreamBatcher, Vocab
from hmlm.errors import UserError
from hmlm.model import CharLM, HMLSTMState
from hmlm.training import rng
from hmlm.training.cuda_graph import set_capturable
from hmlm.training.distributed import Process, all_gather
from hmlm.training.window import LogWindow


@dataclass
class Schedule:
    """What changes while training, besides the weights: saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    lr: float = 0.0
    best_valid_loss: float = math.inf
    bad_evaluations: int = 0  # evaluations since the last improvement
    elapsed: float = 0.0  # seconds of training so far, over all restarts (for train.max_time)


class Run(Protocol):
    """What a checkpoint is made from and restored into: the Trainer's parts (named here so that this module, which
    the Trainer imports, needs nothing of it)."""

    config: Config
    vocab: Vocab
    model: CharLM
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    batcher: StreamBatcher
    state: HMLSTMState | None
    process: Process
    device: torch.device
    run_dir: Path
    window: LogWindow


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def payload(trainer: Run) -> dict[str, Any]:
    """Everything an exact resume needs; every process must call it (the carried state is gathered)."""
    return {
        "format_version": FORMAT_VERSION,
        "config": trainer.config.to_dict(),
        "vocab": trainer.vocab.to_dict(),
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "schedule": vars(trainer.schedule).copy(),
        "data": trainer.batcher.state_dict(),
        "recurrent_state": global_state(trainer.state, trainer.process, trainer.device),
        "rng": {"ranks": rng.gather(trainer.device)},  # every process's generators, in rank order
    }


def save(trainer: Run, name: str, saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write checkpoints/{name}.pt from the main process; returns the payload, so `best` can reuse `last`'s."""
    saved = saved or payload(trainer)  # every process takes part in gathering the state
    if trainer.process.is_main:
        save_checkpoint(checkpoint_dir(trainer.run_dir) / f"{name}.pt", saved)
    return saved


def restore(trainer: Run, saved: dict[str, Any]) -> None:
    """Put a trainer where the run that saved `saved` was, with this run's process count."""
    trainer.model.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    set_capturable(trainer.optimizer, False)  # a CUDA-graph run's checkpoint holds capturable Adam: resume anywhere
    trainer.schedule = Schedule(**saved["schedule"])
    trainer.batcher.load_state_dict(saved["data"])
    process, cfg = trainer.process, trainer.config.train
    if saved["recurrent_state"] is not None:
        trainer.state = local_state(saved["recurrent_state"], process, cfg.batch_size, trainer.device)
    rng.restore(saved["rng"], process.rank, trainer.device, cfg.seed, trainer.schedule.step)
    trainer.window.reset(after_step=trainer.schedule.step)


def global_state(state: HMLSTMState | None, process: Process, device: torch.device) -> list[list[torch.Tensor]] | None:
    """The carried state of all streams (B_global rows), so a resume may use a different process count."""
    if state is None:
        return None
    if not process.distributed:
        return state_to_lists(state)
    return [[torch.cat(all_gather(t, device)) for t in part] for part in state]


def local_state(saved: list[list[torch.Tensor]], process: Process, batch: int, device: torch.device) -> HMLSTMState:
    """This process's rows of a saved global state of `batch` streams."""
    per_rank = batch // process.world_size
    rows = slice(process.rank * per_rank, (process.rank + 1) * per_rank)
    return state_from_lists([[t[rows] for t in part] for part in saved], device)


def diverged(what: str, run_dir: Path) -> UserError:
    """The error that stops a run whose weights became non-finite, naming the checkpoint that is kept."""
    last = checkpoint_dir(run_dir) / "last.pt"
    kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
    advice = "Lower train.lr or train.grad_clip, then resume with --resume or start a new run"
    return UserError(f"{what}; {kept}. {advice}")


def resolve_run(config: Config | None, run_dir: Path, resume: bool, overrides: list[str]) -> tuple[Config, Any]:
    """The config to train with and, when resuming, the checkpoint to continue from."""
    last = checkpoint_dir(run_dir) / "last.pt"
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(
                f"run directory {run_dir} already exists: continue it with --resume, or pick a new one with --run-dir"
            )
        if config is None:
            raise UserError("pass --config FILE (e.g. configs/tiny.yaml), or --resume with an existing --run-dir")
        return config, None
    if not last.exists():
        if (run_dir / "config.yaml").exists():  # stopped before its first checkpoint: start it again
            return load_config(run_dir / "config.yaml", overrides), None
        raise UserError(f"nothing to resume in {run_dir}: no checkpoints/last.pt; start a run without --resume")
    saved = load_checkpoint(last)
    for item in overrides:  # e.g. -s train.max_steps=20000 to train a finished run for longer
        apply_override(saved["config"], item)
    resumed = from_saved(saved["config"])
    saved["config"] = resumed.to_dict()
    return resumed, saved
