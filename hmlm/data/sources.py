"""The registry of downloadable datasets: where each one comes from, which files it needs, how to check them.

Checksums are those of the official files (docs/data.md lists them). PTB has no published checksum of its
archive, so it is checked by the sha256 of its valid and test files (the original files) and by the token
counts of all three splits, the numbers every paper reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from hmlm.errors import UserError

SPLITS = ("train", "valid", "test")

# The names `hmlm data NAME` accepts besides `text` (your own file); `synthetic` is generated, not downloaded.
DATASETS = ("ptb", "text8", "enwik8", "synthetic")


@dataclass(frozen=True)
class Member:
    """One file the dataset needs from its archive, found by its file name (any folder inside the archive)."""

    filename: str
    split: str | None = None  # the split this file is, or None when the splits are cut from one file
    sha1: str | None = None
    sha256: str | None = None
    tokens: int | None = None  # expected token count (PTB)


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    archive: str  # file name of the cached download in DATA_DIR/downloads/
    members: tuple[Member, ...]
    kind: str  # "ptb": one file per split, space-separated symbols; "chars" / "bytes": one file, split by rule
    vocab_size: int | None = None  # expected vocabulary size (checked with the counts)


SOURCES: dict[str, Source] = {
    "ptb": Source(
        name="ptb",
        url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
        archive="simple-examples.tgz",
        members=(
            Member("ptb.char.train.txt", split="train", tokens=5_017_482),
            Member(
                "ptb.char.valid.txt",
                split="valid",
                tokens=393_042,
                sha256="21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
            ),
            Member(
                "ptb.char.test.txt",
                split="test",
                tokens=442_423,
                sha256="1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
            ),
        ),
        kind="ptb",
        vocab_size=50,
    ),
    "text8": Source(
        name="text8",
        url="http://mattmahoney.net/dc/text8.zip",
        archive="text8.zip",
        members=(Member("text8", sha1="0dc3edebc970dcc96137e7deda4d9995af9d93de"),),
        kind="chars",
    ),
    "enwik8": Source(
        name="enwik8",
        url="http://mattmahoney.net/dc/enwik8.zip",
        archive="enwik8.zip",
        members=(Member("enwik8", sha1="57b8363b814821dc9d47aa4d41f58733519076b2"),),
        kind="bytes",
    ),
}


def split_sizes(n: int) -> dict[str, int]:
    """text8 / enwik8 rule: valid = test = n // 20 tokens from the end of the file (valid first), train the rest.

    For the real 100,000,000-symbol files this is the standard 90M / 5M / 5M.
    """
    held_out = n // 20
    return {"train": n - 2 * held_out, "valid": held_out, "test": held_out}


def check_name(name: str) -> None:
    """Raise a UserError listing the valid names when `name` is not a dataset `hmlm data` knows."""
    if name not in DATASETS:
        valid = ", ".join(DATASETS)
        raise UserError(f"unknown dataset {name!r}: choose one of {valid}, or `hmlm data text FILE` for your own text")
