"""`hmlm data text FILE`: your own text as a dataset, in the same format as the others.

FILE is one file or a folder of files; a folder's files (all of them below it, hidden ones skipped) are
concatenated in sorted order of their paths, a separator between two files. Two levels:
- `chars` (default): the Unicode characters (code points) of UTF-8 text; the vocabulary is whatever the text
  contains, so "naïve café – 日本語 🙂" round-trips exactly;
- `bytes`: the raw bytes (the enwik8 convention): any file, any encoding, at most 256 symbols.
The splits are contiguous: the first fraction is train, then valid, then test.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np

from hmlm.data.sources import DATASETS, SPLITS
from hmlm.data.store import ensure_writable, skip_if_prepared, write_dataset
from hmlm.data.tokenize import text_codes, tokenize
from hmlm.errors import UserError

LEVELS = ("chars", "bytes")
DEFAULT_SPLIT = (0.9, 0.05, 0.05)
RESERVED_NAMES = (*DATASETS, "text", "downloads")  # the registry's folders and the download cache


def prepare_text(
    file: Path,
    name: str | None = None,
    data_dir: str | Path = "data",
    level: str = "chars",
    split: tuple[float, float, float] = DEFAULT_SPLIT,
    separator: str = "\n",
    force: bool = False,
) -> Path:
    """Prepare `file` (a file or a folder of files) as the dataset NAME (default: its stem) in DATA_DIR/NAME/."""
    file = Path(file).expanduser()
    if level not in LEVELS:
        raise UserError(f"--level {level!r}: choose chars or bytes")
    fractions = _check_fractions(split)
    files = _input_files(file)
    name = _check_name(name if name is not None else (file.resolve().name if file.is_dir() else file.stem))
    target = Path(data_dir) / name
    if skip_if_prepared(target, force):
        return target
    ensure_writable(Path(data_dir))

    joint = separator.encode("utf-8")
    data, starts = _concatenate(files, joint)
    if len(data) == len(joint) * (len(files) - 1):  # nothing but separators: every file is empty
        raise UserError(f"{file} is empty: there is no text to model")
    if level == "chars":
        codes_all = _char_codes(data, files, starts)
    else:
        codes_all = np.frombuffer(data, dtype=np.uint8)  # (n,) the bytes themselves

    sizes = _split_sizes(len(codes_all), fractions)
    bounds = np.cumsum([0] + [sizes[s] for s in SPLITS])
    codes = {s: codes_all[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    vocab, ids = tokenize(codes, level)
    source = {"name": file.resolve().name, "sha256": hashlib.sha256(data).hexdigest()}
    return write_dataset(target, vocab, ids, source)


def parse_split(text: str) -> tuple[float, float, float]:
    """`--split 0.9,0.05,0.05` as three fractions (checked by prepare_text)."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"--split {text!r}: give three fractions for train, valid and test, e.g. 0.9,0.05,0.05")
    return values  # type: ignore[return-value]


def parse_separator(text: str) -> str:
    """`--separator` with backslash escapes understood (\\n, \\t, \\x00...), as typed in a shell."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError:
        raise UserError(f"--separator {text!r}: a backslash starts an unknown escape") from None


def _check_fractions(split: tuple[float, ...]) -> tuple[float, float, float]:
    shown = ",".join(f"{f:g}" for f in split)
    if len(split) != 3 or not all(math.isfinite(f) and f > 0 for f in split):
        raise UserError(f"--split {shown}: give three fractions above 0 for train, valid and test, e.g. 0.9,0.05,0.05")
    if abs(sum(split) - 1) > 1e-6:
        raise UserError(f"--split {shown}: the fractions add up to {sum(split):g}, not 1")
    return (split[0], split[1], split[2])


def _split_sizes(n: int, fractions: tuple[float, float, float]) -> dict[str, int]:
    """Contiguous split sizes; each split needs 2 tokens (one to read, one to predict)."""
    valid, test = int(n * fractions[1]), int(n * fractions[2])
    sizes = {"train": n - valid - test, "valid": valid, "test": test}
    for split, size in sizes.items():
        if size < 2:
            shown = ",".join(f"{f:g}" for f in fractions)
            raise UserError(
                f"--split {shown} leaves the {split} split {size} of the text's {n:,} tokens (it needs 2): "
                "use a longer text or give that split a larger fraction"
            )
    return sizes


def _input_files(file: Path) -> list[Path]:
    if file.is_file():
        return [file]
    if not file.is_dir():
        raise UserError(f"{file}: no such file or folder")
    files = sorted(
        (
            p
            for p in file.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(file).parts)
        ),
        key=lambda p: p.relative_to(file).as_posix(),
    )
    if not files:
        raise UserError(f"{file} is an empty folder: put the text files to model in it")
    return files


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[^/\\.][^/\\]*", name):
        raise UserError(f"{name!r} cannot name a dataset folder: choose another with --name")
    if name in RESERVED_NAMES:
        raise UserError(f"{name!r} is the name of a built-in dataset: choose another with --name")
    return name


def _concatenate(files: list[Path], separator: bytes) -> tuple[bytes, list[int]]:
    """The files' bytes joined by `separator`, and the offset where each file starts in the result."""
    parts, starts, offset = [], [], 0
    for i, path in enumerate(files):
        try:
            content = path.read_bytes()
        except OSError as error:
            raise UserError(f"cannot read {path} ({error.strerror or error})") from None
        if i:
            parts.append(separator)
            offset += len(separator)
        starts.append(offset)
        parts.append(content)
        offset += len(content)
    return b"".join(parts), starts


def _char_codes(data: bytes, files: list[Path], starts: list[int]) -> np.ndarray:
    """(n,) the code points of UTF-8 `data`, or a UserError naming the file and byte that are not text."""
    nul = data.find(b"\0")
    if nul >= 0:
        path, offset = _locate(nul, files, starts)
        raise UserError(
            f"{path} looks binary (a NUL byte at byte offset {offset:,}): give a text file, "
            "or use --level bytes to model its raw bytes"
        )
    try:
        return text_codes(data)
    except UnicodeDecodeError as error:
        path, offset = _locate(error.start, files, starts)
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at byte offset {offset:,}): "
            "convert it to UTF-8, or use --level bytes to model its raw bytes"
        ) from None


def _locate(position: int, files: list[Path], starts: list[int]) -> tuple[Path, int]:
    """Which file a position of the concatenation falls in, and the offset within that file."""
    index = int(np.searchsorted(starts, position, side="right")) - 1
    return files[index], position - starts[index]
