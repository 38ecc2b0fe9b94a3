"""A prepared dataset on disk (DATA_DIR/NAME/, docs/design.md, "Data format"), opened without reading it into memory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmlm.data.sources import DATASETS, SPLITS
from hmlm.data.store import FORMAT_VERSION
from hmlm.data.vocab import Vocab
from hmlm.errors import UserError

BOUNDARY_LEVELS = ("word", "phrase")  # true boundaries a dataset may store: {split}.{level}.bin


@dataclass
class Dataset:
    name: str
    path: Path
    vocab: Vocab
    meta: dict

    def tokens(self, split: str) -> int:
        return int(self.meta["splits"][_check_split(split)]["tokens"])

    def split(self, name: str) -> np.ndarray:
        """(tokens,) the split's token ids, memory-mapped read-only ("train" | "valid" | "test")."""
        return np.memmap(self.path / f"{name}.bin", dtype=self.meta["dtype"], mode="r", shape=(self.tokens(name),))

    def true_boundaries(self, split: str) -> dict[str, np.ndarray]:
        """{"word": (tokens,) uint8, "phrase": ...}: 1 on the last token of each unit; {} when not known.

        Only generated data knows its true boundaries (the synthetic dataset); for real text, word
        boundaries are the positions of the vocabulary's space symbol."""
        found = {}
        for level in BOUNDARY_LEVELS:
            path = self.path / f"{split}.{level}.bin"
            if path.is_file():
                found[level] = np.memmap(path, dtype=np.uint8, mode="r", shape=(self.tokens(split),))
        return found


def open_dataset(name: str, data_dir: str | Path = "data") -> Dataset:
    """Open DATA_DIR/NAME/ as prepared by `hmlm data`; a UserError says how to prepare it when missing."""
    data_dir = Path(data_dir)
    path = data_dir / name
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"dataset {name!r} is not prepared in {data_dir}: run `{_prepare_command(name, data_dir)}`"
        ) from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path / 'meta.json'} ({error}): {_rebuild(name, data_dir)}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} was prepared in another format: {_rebuild(name, data_dir)}")
    try:
        vocab = Vocab.from_dict(json.loads((path / "vocab.json").read_text(encoding="utf-8")))
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            expected = int(meta["splits"][split]["tokens"]) * itemsize
            actual = (path / f"{split}.bin").stat().st_size
            if actual != expected:
                raise UserError(
                    f"{path / split}.bin has {actual:,} bytes, not {expected:,}: {_rebuild(name, data_dir)}"
                )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path} is damaged ({error}): {_rebuild(name, data_dir)}") from None
    if len(vocab) != meta.get("vocab_size"):
        raise UserError(f"{path}: vocab.json does not match meta.json: {_rebuild(name, data_dir)}")
    return Dataset(name=name, path=path, vocab=vocab, meta=meta)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


def _prepare_command(name: str, data_dir: Path) -> str:
    where = "" if data_dir == Path("data") else f" --data-dir {data_dir}"
    if name in DATASETS:
        return f"hmlm data {name}{where}"
    return f"hmlm data text FILE --name {name}{where}"


def _rebuild(name: str, data_dir: Path) -> str:
    return f"prepare it again with `{_prepare_command(name, data_dir)} --force`"
