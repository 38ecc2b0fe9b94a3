"""The work of `hmlm data` and `hmlm train`, which no other module owns: options checked against each other, the
call, and the line that reports it. Each returns the lines to print, each with whether it goes to stderr."""

from __future__ import annotations

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
    # A finished run resumed is refused like every limit (hmlm.training.limits.AlreadyFinished: one line, exit status
    # 2).
    summary = run_training(loaded, run_dir, resume=resume, overrides=set_ if resume else [], progress=not quiet)
    if not summary.main_process:
        return []
    return [(f"{summary.stopped} at step {summary.step} (epoch {summary.epoch}); "
             f"best valid bpc {summary.best_valid_bpc:.4f}; run in {summary.run_dir}", False)]  # fmt: skip
