"""Write a prepared dataset to DATA_DIR/NAME/, atomically.

The files are written into a hidden temporary folder next to the target and the folder is renamed into place
at the end, so DATA_DIR/NAME/ either holds a whole dataset or does not exist: an error or Ctrl-C halfway
leaves nothing behind that `open_dataset` could mistake for a dataset.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hmlm.data.messages import info
from hmlm.data.sources import SPLITS
from hmlm.data.vocab import Vocab
from hmlm.errors import UserError

FORMAT_VERSION = 1


def is_prepared(target: Path) -> bool:
    """True when `target` holds a finished dataset (meta.json is the last file written and only appears
    with the rename of the whole folder)."""
    return (target / "meta.json").is_file()


def skip_if_prepared(target: Path, force: bool) -> bool:
    """True (after saying so) when the dataset is already there and --force does not ask to rebuild it."""
    if is_prepared(target) and not force:
        info(f"{target.name} is already prepared in {target} (--force rebuilds it)")
        return True
    return False


def ensure_writable(folder: Path) -> None:
    """Fail early, before any download, when the data folder cannot be created or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hmlm-write-test-{secrets.token_hex(4)}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(
            f"cannot write to the data folder {folder} ({reason}): choose another with --data-dir or make it writable"
        ) from None


def write_dataset(
    target: Path,
    vocab: Vocab,
    splits: Mapping[str, np.ndarray],
    source: dict,
    extra: Mapping[str, np.ndarray] | None = None,
    meta_extra: Mapping[str, object] | None = None,
) -> Path:
    """Write DATA_DIR/NAME/{train,valid,test}.bin, vocab.json, meta.json (docs/design.md, "Data format"),
    replacing any older version of the dataset only once the new one is complete.

    splits: token ids of each split (all one dtype). source: {"name": ..., "sha256": ...}. extra: more arrays
    to store beside the splits, by file name (the synthetic data's true boundaries, e.g. "train.word.bin").
    meta_extra: more keys for meta.json (the synthetic data's "generator").
    """
    dtype = {array.dtype for array in splits.values()}.pop()
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": target.name,
        "dtype": dtype.name,
        "vocab_size": len(vocab),
        "splits": {name: {"tokens": int(len(splits[name]))} for name in SPLITS},
        "source": source,
    } | dict(meta_extra or {})
    ensure_writable(target.parent)
    # A name of our own next to the target (same file system, so the rename is atomic), created with the
    # default permissions; tempfile.mkdtemp would make the dataset readable by its owner only.
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        for name in SPLITS:
            splits[name].tofile(staging / f"{name}.bin")
        for filename, array in (extra or {}).items():
            array.tofile(staging / filename)
        text = json.dumps(vocab.to_dict(), ensure_ascii=False)
        (staging / "vocab.json").write_text(text + "\n", encoding="utf-8")
        (staging / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace(staging, target)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the dataset to {target} ({error.strerror or error})") from None
    except BaseException:  # Ctrl-C included: never leave the half-written folder
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info(f"wrote {target}")
    return target


def _replace(staging: Path, target: Path) -> None:
    """Move the finished `staging` folder to `target`; an older `target` (--force) is removed only after."""
    if not target.exists():
        staging.rename(target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)  # put the previous dataset back rather than leave none
        raise
    shutil.rmtree(old, ignore_errors=True)
