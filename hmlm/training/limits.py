"""What a run can do, checked before anything is allocated: splits long enough for the batch and the BPTT length,
memory enough for the estimate of hmlm/training/memory.py, a limit not yet reached when resuming; and what to do when
memory runs out anyway. Each failure is one line that names the key to change and a value that works.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hmlm.checkpoint import Trained
from hmlm.config import Config
from hmlm.data import Dataset
from hmlm.errors import UserError
from hmlm.fast import kernels
from hmlm.training.memory import (
    MemoryEstimate,
    MemoryShape,
    OutOfMemory,
    available_bytes,
    check_fits,
    estimate,
    format_bytes,
    largest_fitting,
    out_of_memory_as_user_error,
)


class AlreadyFinished(UserError):
    """`--resume` on a run that already reached its limit: refused like every other limit (one line, exit status
    2), with nothing written; the message says how to train on."""


# --- Split lengths -----------------------------------------------------------------------------------------------


def check_split(
    tokens: int, split: str, batch_size: int, seq_len: int, batch_key: str, seq_key: str | None, full_batch: bool
) -> None:
    """A split of `tokens` cut into `batch_size` streams must give every stream seq_len + 1 tokens (one full
    batch: seq_len inputs and their targets) when `full_batch`, else at least 2 (one input, one target).
    Raises a UserError naming the largest batch size (and seq_len, where the caller can change it) that work."""
    stream = tokens // batch_size
    need = seq_len + 1 if full_batch else 2
    if stream >= need:
        return
    largest_batch = tokens // need
    options = [f"{batch_key}={largest_batch} or less"] if largest_batch >= 1 else []
    if seq_key is not None and full_batch and stream >= 2:
        options.append(f"{seq_key}={stream - 1} or less")
    if not options:
        options = [f"a longer {split} split"]
    what = f"{batch_key}={batch_size} x {seq_key}={seq_len}" if seq_key and full_batch else f"{batch_key}={batch_size}"
    raise UserError(
        f"the {split} split ({tokens:,} tokens) is too short for {what}: each of the {batch_size:,} streams gets "
        f"{stream:,} tokens and needs {need:,}; use {', or '.join(options)}"
    )


def check_training_splits(config: Config, dataset: Dataset) -> None:
    """Every training stream longer than seq_len, and the validation split (what evaluation reads of it) long
    enough for one batch."""
    cfg = config.train
    batch, seq = "train.batch_size", "train.seq_len"
    check_split(dataset.tokens("train"), "train", cfg.batch_size, cfg.seq_len, batch, seq, full_batch=True)
    valid = dataset.tokens("valid")
    if cfg.eval_tokens and cfg.eval_tokens + cfg.batch_size < valid:  # evaluate() reads only this much of it
        needed = cfg.batch_size * cfg.seq_len
        if cfg.eval_tokens < needed and valid >= cfg.batch_size * (cfg.seq_len + 1):
            raise UserError(
                f"train.eval_tokens={cfg.eval_tokens:,} is less than one validation batch of train.batch_size="
                f"{cfg.batch_size} x train.seq_len={cfg.seq_len}: use train.eval_tokens={needed} or more (0: all)"
            )
    check_split(valid, "valid", cfg.batch_size, cfg.seq_len, batch, seq, full_batch=True)


# --- Memory ------------------------------------------------------------------------------------------------------


def training_memory_shape(config: Config, dataset: Dataset, device: torch.device, world_size: int) -> MemoryShape:
    cfg = config.train
    dtype = torch.float64 if cfg.precision == "fp64" else torch.float32
    precision = cfg.precision if device.type == "cuda" or cfg.precision != "bf16" else "fp32"  # bf16: CUDA only
    per_process = cfg.batch_size // world_size
    kept = (cfg.eval_tokens or dataset.tokens("valid")) // world_size  # boundaries kept for the F1 scores
    return MemoryShape(
        model=config.model,
        vocab_size=len(dataset.vocab),
        batch_size=per_process,
        seq_len=cfg.seq_len,
        precision=precision,
        kernels=kernels.select(device, dtype),  # builds the kernels if need be, as the first step would
        eval_tokens=kept,
    )


def check_training(config: Config, dataset: Dataset, device: torch.device, world_size: int) -> str:
    """All checks before a training run allocates anything. Returns the line to print: parameters, device,
    the estimated peak memory and what is free."""
    check_training_splits(config, dataset)
    shape = training_memory_shape(config, dataset, device, world_size)
    if config.train.memory_check:
        est, free = check_fits(shape, device)
    else:
        est, free = estimate(shape), available_bytes(device)
    return describe(est, free, device, shape)


def describe(est: MemoryEstimate, free: int | None, device: torch.device, shape: MemoryShape) -> str:
    params = est.parameters // (8 if shape.precision == "fp64" else 4)
    where = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    return (
        f"{params:,} parameters on {where}; estimated peak memory {format_bytes(est.total)}, "
        f"{format_bytes(free)} available"
    )


def check_evaluation(trained: Trained, dataset: Dataset, split: str, batch_size: int) -> None:
    """`hmlm eval`: --batch-size streams of at least 2 tokens each, and memory for one evaluation batch (the model
    is loaded already; a shorter last batch is fine here, so the split need not hold a full one)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")
    check_split(dataset.tokens(split), split, batch_size, trained.config.train.seq_len, "--batch-size", None, False)
    device = next(trained.model.parameters()).device
    dtype = next(trained.model.parameters()).dtype
    shape = MemoryShape(
        model=trained.config.model,
        vocab_size=len(trained.vocab),
        batch_size=batch_size,
        seq_len=trained.config.train.seq_len,
        precision="fp64" if dtype == torch.float64 else "fp32",
        kernels=kernels.select(device, dtype),
        eval_tokens=dataset.tokens(split),
    )
    need, free = estimate(shape).evaluation, available_bytes(device)
    if free is not None and need > free:
        best = largest_fitting(lambda b: estimate(replace(shape, batch_size=b)).evaluation <= free, batch_size - 1)
        hint = f"use --batch-size={best} or less" if best else "this model's evaluation does not fit at any batch size"
        raise UserError(
            f"evaluating with --batch-size {batch_size} needs about {format_bytes(need)} and "
            f"{format_bytes(free)} is free: {hint}"
        )


@contextmanager
def evaluation_out_of_memory(trained: Trained, batch_size: int) -> Iterator[None]:
    what = f"evaluating with --batch-size {batch_size} x seq_len {trained.config.train.seq_len}"
    with out_of_memory_as_user_error(what, "--batch-size"):
        yield


# --- A finished run stays finished -------------------------------------------------------------------------------


def check_not_finished(config: Config, schedule: dict[str, Any], run_dir: Path) -> None:
    """Raise AlreadyFinished when the saved schedule has reached a limit of `config` (with its overrides)."""
    cfg = config.train
    step, epoch, elapsed = schedule["step"], schedule["epoch"], schedule["elapsed"]
    reached = None
    if cfg.max_steps and step >= cfg.max_steps:
        reached = ("train.max_steps", cfg.max_steps, max(2 * cfg.max_steps, step + 1))
    elif epoch >= cfg.max_epochs:
        reached = ("train.max_epochs", cfg.max_epochs, max(2 * cfg.max_epochs, epoch + 1))
    elif cfg.max_time and elapsed >= cfg.max_time:
        reached = ("train.max_time", cfg.max_time, max(2 * cfg.max_time, elapsed + 60))
    if reached is not None:
        key, value, more = reached
        raise AlreadyFinished(
            f"{run_dir} already finished: it reached {key}={value:g} at step {step} (epoch {epoch}); its checkpoints "
            f"are unchanged. To train on, raise the limit: hmlm train --run-dir {run_dir} --resume -s {key}={more:g}"
        )


# --- Out of memory while training --------------------------------------------------------------------------------


@contextmanager
def out_of_memory_in_training(config: Config, run_dir: Path, existed: bool, resuming: bool) -> Iterator[None]:
    """An out-of-memory error becomes one line. After a checkpoint, the last one stays as it was. Before any, a new
    run leaves nothing (the directory goes if this run made it, else what it wrote there); a resumed one keeps
    its config, to be resumed again with a smaller setting."""
    cfg = config.train
    what = (
        f"training {config.model.kind} {config.model.hidden_sizes} with batch {cfg.batch_size} x seq_len {cfg.seq_len}"
    )
    lower = "train.batch_size, train.seq_len or model.hidden_sizes"
    last = run_dir / "checkpoints" / "last.pt"
    try:
        with out_of_memory_as_user_error(what, lower):
            yield
    except OutOfMemory as error:
        if last.exists():
            raise OutOfMemory(f"{error}; the last checkpoint {last} is kept") from None
        if not resuming:
            remove_unfinished(run_dir, existed)
        raise


def remove_unfinished(run_dir: Path, existed: bool) -> None:
    """Remove what a run wrote before its first checkpoint: the directory if this run made it, else its contents."""
    if not run_dir.exists():
        return
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in run_dir.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
