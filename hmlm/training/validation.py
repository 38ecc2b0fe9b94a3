"""What training does with the validation split: its evaluation, the learning rate's plateau rule, and the warning
about streams locked in a regime that training does not have (docs/locked-streams.md)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from hmlm.analysis.boundaries import split_references
from hmlm.analysis.evaluate import EvalResult, evaluate
from hmlm.analysis.locks import LOCK_RATE, Locks
from hmlm.config import TrainConfig
from hmlm.data import Dataset
from hmlm.model import CharLM
from hmlm.training.distributed import Process, all_reduce_sum
from hmlm.training.state import Schedule


def validate(
    model: CharLM, dataset: Dataset, cfg: TrainConfig, device: torch.device, process: Process, autocast: bool,
    progress: bool,
) -> EvalResult:  # fmt: skip
    """The validation split, as `hmlm eval` scores it, from every stream's zero state; all processes share it."""
    return evaluate(
        model,
        dataset.split("valid"),
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        device=device,
        max_tokens=cfg.eval_tokens,
        rank=process.rank,
        world_size=process.world_size,
        reduce_sum=all_reduce_sum if process.distributed else None,
        autocast=autocast,
        progress=progress,
        references=split_references(dataset, "valid"),  # boundary F1 against word (and phrase) ends
        seed=cfg.seed,
        cuda_graph=cfg.cuda_graph,
    )


def after_evaluation(
    schedule: Schedule, loss: float, cfg: TrainConfig, optimizer: torch.optim.Optimizer, is_main: bool
) -> bool:
    """Apply the plateau rule to the optimizer and say so when it cuts the rate. True if this evaluation is best."""
    improved, cut = plateau(schedule, loss, cfg)
    if cut:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr
        if is_main:
            evaluations = cfg.lr_patience + 1
            tqdm.write(f"step {schedule.step}: validation did not improve for {evaluations} evaluations; "
                       f"learning rate now {schedule.lr:.3g}")  # fmt: skip
    return improved


def plateau(schedule: Schedule, loss: float, cfg: TrainConfig) -> tuple[bool, bool]:
    """The paper's rule, "divide the learning rate by 50 when validation stops improving", with "stops improving"
    read as `lr_patience + 1` evaluations in a row that do not beat the best one. With a patience of 1 (the
    shipped configs) one bad evaluation cannot cut the rate: it takes a second one, and the next good evaluation
    clears the count. Updates `schedule`; returns (this evaluation is the best so far, the rate was cut)."""
    if loss < schedule.best_valid_loss:
        schedule.best_valid_loss, schedule.bad_evaluations = loss, 0
        return True, False
    schedule.bad_evaluations += 1
    if schedule.bad_evaluations <= cfg.lr_patience or schedule.lr <= cfg.min_lr:
        return False, False
    schedule.bad_evaluations = 0
    schedule.lr = max(schedule.lr / cfg.lr_decay, cfg.min_lr)
    return False, True


def lock_warning(locks: Locks | None, train_rates: list[float]) -> str | None:
    """The warning about locked streams, or None. A layer that fires on nearly every step in training as well (early
    in a run) is not a lock that fresh starts cause: its count is logged, the warning is kept for a regime that
    training does not have."""
    if locks is None or not locks.warning():
        return None
    if train_rates and train_rates[locks.layer - 1] > LOCK_RATE:
        return None
    return locks.warning()
