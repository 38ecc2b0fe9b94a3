"""The work of `hmlm data`, `train`, `eval` and `sample`: options checked against each other, the checks made
before anything is allocated, the call, and the lines that report it. Here, above analysis and training, because
they use both (the memory checks live with training). Each returns the lines to print, each with whether it goes
to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hmlm.errors import UserError


def prepare_data(
    name: str,
    file: Path | None,
    data_dir: Path,
    source: str | None,
    no_verify: bool,
    force: bool,
    name_: str | None,
    level: str | None,
    split: str | None,
    separator: str | None,
    seed: int | None,
    no_spaces: bool,
) -> list[tuple[str, bool]]:
    """`hmlm data`: prepare a registry dataset, the synthetic one, or your own text; one line describing it."""
    from hmlm.data import DATASETS, open_dataset, prepare_dataset, prepare_text
    from hmlm.data.text import DEFAULT_SPLIT, parse_separator, parse_split

    if name == "text":
        if file is None:
            raise UserError("`hmlm data text` needs the FILE (or folder) to prepare: hmlm data text FILE")
        if source is not None or no_verify:
            raise UserError("--source and --no-verify are for the downloaded datasets, not for `text`")
        if seed is not None or no_spaces:
            raise UserError(f"{'--seed' if seed is not None else '--no-spaces'} is for `hmlm data synthetic` only")
        path = prepare_text(
            file,
            name=name_,
            data_dir=data_dir,
            level=level or "chars",
            split=parse_split(split) if split is not None else DEFAULT_SPLIT,
            separator=parse_separator(separator) if separator is not None else "\n",
            force=force,
        )
    else:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or text FILE")
        given = {"FILE": file, "--name": name_, "--level": level, "--split": split, "--separator": separator}
        text_only = [flag for flag, value in given.items() if value is not None]
        if text_only:
            raise UserError(f"{', '.join(text_only)}: only for `hmlm data text FILE`, not for {name}")
        path = prepare_dataset(name, data_dir=data_dir, source=source, verify=not no_verify, force=force, seed=seed,
                               spaces=not no_spaces)  # fmt: skip

    dataset = open_dataset(path.name, path.parent)
    tokens = " / ".join(f"{dataset.tokens(s):,}" for s in ("train", "valid", "test"))
    vocab = f"{len(dataset.vocab)} symbols ({dataset.vocab.kind})"
    return [(f"{dataset.name} in {dataset.path}: {tokens} tokens (train / valid / test), {vocab}", False)]


def train_run(
    config: Path | None, set_: list[str], run_dir: Path | None, resume: bool, quiet: bool
) -> list[tuple[str, bool]]:
    """`hmlm train`: a new run from a config, or the run in `run_dir` resumed; its summary (main process only)."""
    from hmlm.config import load_config
    from hmlm.training.trainer import train as run_training

    if run_dir is None:
        if config is None:
            raise UserError("pass --config FILE for a new run, or --run-dir DIR --resume to continue one")
        run_dir = Path("runs") / config.stem
    loaded = load_config(config, set_) if config is not None and not resume else None
    # A finished run resumed is refused like every limit (hmlm.training.limits.AlreadyFinished: one line, exit 2).
    summary = run_training(loaded, run_dir, resume=resume, overrides=set_ if resume else [], progress=not quiet)
    if not summary.main_process:
        return []
    return [(f"{summary.stopped} at step {summary.step} (epoch {summary.epoch}); "
             f"best valid bpc {summary.best_valid_bpc:.4f}; run in {summary.run_dir}", False)]  # fmt: skip


def evaluate_run(
    run: Path, split: str, checkpoint: str, batch_size: int, data_dir: Path | None, json_: bool, device: str
) -> list[tuple[str, bool]]:
    """`hmlm eval`: bits per character of a trained run on a split, as a sentence or one JSON object, and the
    locked streams' warning; the lines to print, each with whether it goes to stderr."""
    from hmlm.analysis.boundaries.metrics import split_references
    from hmlm.analysis.evaluate import evaluate
    from hmlm.checkpoint import load_trained
    from hmlm.data import open_dataset
    from hmlm.devices import resolve_device
    from hmlm.training.limits import check_evaluation, evaluation_out_of_memory

    if split not in ("valid", "test"):
        raise UserError(f"--split must be valid or test, not {split!r}")
    target = resolve_device(device)
    trained = load_trained(run, checkpoint, target)
    config, path = trained.config, trained.path
    dataset = open_dataset(config.data.name, data_dir or config.data.dir)
    check_evaluation(trained, dataset, split, batch_size)
    with evaluation_out_of_memory(trained, batch_size):
        result = evaluate(trained.model, dataset.split(split), batch_size, config.train.seq_len, device=target,
                          progress=not json_, references=split_references(dataset, split))  # fmt: skip
    report = {"bpc": result.bpc, "split": split, "tokens": result.tokens, "loss": result.loss,
              "checkpoint": str(path), "dataset": config.data.name}  # fmt: skip
    report |= {f"boundary_rate_layer{i + 1}": rate for i, rate in enumerate(result.boundary_rate)}
    if result.boundary_stats is not None:  # boundary_f1_word_layer1, ..., _surprisal_peak (`hmlm boundaries` adds more)
        report |= result.boundary_stats.flat(baselines=False, rates=False)
    locks = result.locks
    if locks is not None and locks.layer:  # streams read from the zero state, locked into a layer firing every step
        report |= {"streams": locks.streams, "locked_streams": locks.locked, "locked_bpc": locks.bpc}
    if json_:
        lines = [(json.dumps(report), False)]
    else:
        locked = ""
        if locks is not None and locks.layer:
            locked = f", {locks.locked} of {locks.streams} streams locked"
            locked += f" (at {locks.bpc:.3f} bpc)" if locks.bpc is not None else ""
        lines = [(f"{split} bpc {result.bpc:.4f} over {result.tokens:,} tokens{locked} ({path})", False)]
    if locks is not None and locks.warning():
        lines.append((locks.warning(), True))
    return lines


def sample_run(
    run: Path,
    prompt: str,
    length: int,
    temperature: float,
    top_k: int,
    seed: int,
    checkpoint: str,
    device: str,
) -> list[tuple[str, bool]]:
    """`hmlm sample`: write the prompt, then the generated text as it comes, to stdout; then the lines to print
    after it, each with whether it goes to stderr (the warning of a sample that locked)."""
    import torch

    from hmlm.analysis.locks import LOCK_RATE, LOCK_TAIL, LockWatch
    from hmlm.analysis.sample import generate
    from hmlm.checkpoint import load_model
    from hmlm.devices import resolve_device
    from hmlm.training.memory import out_of_memory_in

    model, vocab = load_model(run, checkpoint, resolve_device(device))
    watch = LockWatch()
    pieces = generate(model, vocab, prompt, length, temperature, top_k, torch.Generator().manual_seed(seed), watch)
    pieces = out_of_memory_in(pieces, f"sampling after a prompt of {len(prompt):,} characters", "--prompt's length")
    first = next(pieces, "")  # encode the prompt (and fail on unknown characters) before printing anything
    sys.stdout.write(prompt + first)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    locks = watch.result()
    if not locks.locked:
        return []
    return [(f"warning: the sample locked: layer {locks.layer} fired on more than {LOCK_RATE:.0%} of its "
             f"last {min(watch.steps, LOCK_TAIL)} steps, so the text after that point is degraded; a model "
             "trained with train.reset_every (the shipped configs) does not lock", True)]  # fmt: skip
