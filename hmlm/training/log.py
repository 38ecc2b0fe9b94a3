"""What a training run reports: TensorBoard scalars and text in the run directory, samples.txt, the progress bar's
figures and the console lines. Only the main process writes; the others compute the same figures, so that every
process reads the device at the same checks."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from hmlm.analysis.evaluate import EvalResult
from hmlm.analysis.sample import generate_ids
from hmlm.config import TrainConfig
from hmlm.data import Dataset
from hmlm.model import CharLM
from hmlm.training.distributed import Process
from hmlm.training.state import Schedule
from hmlm.training.validation import lock_warning
from hmlm.training.window import WindowTotals

LN2 = math.log(2)


class RunLog:
    def __init__(self, run_dir: Path, process: Process) -> None:
        self.run_dir, self.process = run_dir, process
        self.writer = None  # TensorBoard's, on the main process from open() on
        self.train_rates: list[float] = []  # each boundary layer's firing rate in the last logged window

    def open(self, step: int) -> None:
        if self.process.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops what a killed run logged after its last checkpoint (so curves do not double); what
            # it logged at the checkpoint's own step was written before the checkpoint and stays.
            self.writer = SummaryWriter(str(self.run_dir), purge_step=step + 1 if step else None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def train(self, totals: WindowTotals, schedule: Schedule, slope: float, speed: float,
              prior_terms: list[torch.Tensor], bar: tqdm) -> None:  # fmt: skip
        """Means over the steps since the last check, of the global batch (all processes' sums)."""
        loss, grad_norm = totals.means(self.process.world_size)
        rates = [fired / (totals.positions * self.process.world_size) for fired in totals.boundaries]
        self.train_rates = rates
        bar.set_postfix(loss=f"{loss:.3f}", bpc=f"{loss / LN2:.3f}", chars_s=f"{speed:,.0f}")
        self.scalars(
            "train",
            {"loss": loss, "bpc": loss / LN2, "lr": schedule.lr, "slope": slope, "grad_norm": grad_norm}
            | {"chars_per_sec": speed}
            | {f"boundary_rate_layer{i + 1}": r for i, r in enumerate(rates)}
            # the prior's terms at the window's last step (a read at this check, as the sums above)
            | {f"boundary_prior_layer{i + 1}": t.item() for i, t in enumerate(prior_terms)},
            schedule.step,
        )

    def evaluation(self, result: EvalResult, improved: bool, schedule: Schedule, model: CharLM, dataset: Dataset,
                   cfg: TrainConfig) -> None:  # fmt: skip
        step = schedule.step
        self.scalars("valid", {"bpc": result.bpc, "loss": result.loss}, step)
        self.scalars("valid", {f"boundary_rate_layer{i + 1}": r for i, r in enumerate(result.boundary_rate)}, step)
        if result.boundary_stats is not None:  # precision, recall, F1 per layer; mean segment length
            scores = result.boundary_stats.flat(baselines=False, rates=False)
            self.scalars("valid", {key: value for key, value in scores.items() if value is not None}, step)
        locks = result.locks
        if locks is not None and locks.layer:  # streams locked into their highest layer firing on every step
            self.scalars("valid", {"locked_streams": locks.locked}
                         | ({"locked_bpc": locks.bpc} if locks.bpc is not None else {}), step)  # fmt: skip
        if self.process.is_main:
            self.sample(model, dataset, cfg, step)
            best = " (best)" if improved else ""
            tqdm.write(f"step {step} epoch {schedule.epoch}: valid bpc {result.bpc:.4f}{best}")
            warning = lock_warning(locks, self.train_rates)
            if warning:
                tqdm.write(warning)

    def sample(self, model: CharLM, dataset: Dataset, cfg: TrainConfig, step: int) -> None:
        if self.writer is None or cfg.sample_length <= 0:
            return
        prompt = [int(t) for t in dataset.split("valid")[:20]]
        generator = torch.Generator().manual_seed(cfg.seed + step)  # draws on the CPU (sample.py)
        ids = list(generate_ids(model, prompt, cfg.sample_length, generator=generator))
        model.train()
        text = dataset.vocab.decode(prompt) + " | " + dataset.vocab.decode(ids)
        self.writer.add_text("sample", "    " + text.replace("\n", "\n    "), step)  # markdown code
        with open(self.run_dir / "samples.txt", "a", encoding="utf-8") as file:
            file.write(f"--- step {step}\n{text}\n")
