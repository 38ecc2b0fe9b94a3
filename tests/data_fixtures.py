"""Helpers for the data tests: archives in the real formats built from ../shared/data, and the CLI in-process.

The archives (built once per session by a fixture of the test module): simple-examples.tgz holding
./simple-examples/data/ptb.char.*.txt as the official download names them, enwik8.zip and text8.zip (one
member each, made from the real prefixes), and broken variants for the error tests. The archives whose paths
escape the folder they would be extracted to need no corpus (they are refused before any content is read):
built from a few made-up bytes, they are tested on a fresh clone too.
"""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from hmlm.cli import main

PTB_FILES = ("ptb.char.train.txt", "ptb.char.valid.txt", "ptb.char.test.txt")


@dataclass
class Archives:
    ptb: Path  # simple-examples.tgz
    enwik8: Path  # enwik8.zip
    text8: Path  # text8.zip
    ptb_truncated: Path  # the first 60% of simple-examples.tgz
    enwik8_corrupt: Path  # enwik8.zip with damaged compressed data (intact zip structure)
    text8_truncated: Path  # text8.zip without its end (no central directory)
    text8_missing_member: Path  # a zip whose one member is named text9
    enwik8_bytes: bytes
    text8_bytes: bytes
    folder: Path  # the extracted files in nested folders (enwik8, text8 and the PTB files)


def tgz(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A gzipped tar as the official PTB download is made: its folder first, then the links and members given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        folder = tarfile.TarInfo("./simple-examples/data")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(folder)
        for name, target in (links or {}).items():
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            archive.addfile(link)
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o644
            archive.addfile(info, io.BytesIO(content))
    return path


def zipped(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


@dataclass
class UnsafeArchives:
    """Archives that hold the files a dataset needs and a path out of the folder they would be extracted to."""

    ptb_escaping: Path  # simple-examples.tgz plus a member ../../evil.txt
    ptb_link_out: Path  # simple-examples.tgz plus a symbolic link to /etc/passwd
    text8_escaping: Path  # text8.zip plus a member ../evil


def build_unsafe_archives(out: Path) -> UnsafeArchives:
    """The unsafe archives, from a few made-up bytes per member: the paths are refused before anything is read."""
    ptb_members = {f"./simple-examples/data/{name}": b"a b c\n" for name in PTB_FILES}
    return UnsafeArchives(
        ptb_escaping=tgz(out / "escaping" / "simple-examples.tgz", {**ptb_members, "../../evil.txt": b"outside\n"}),
        ptb_link_out=tgz(
            out / "link" / "simple-examples.tgz", ptb_members, links={"./simple-examples/data/passwd": "/etc/passwd"}
        ),  # fmt: skip
        text8_escaping=zipped(out / "escaping" / "text8.zip", {"text8": b"a b c", "../evil": b"outside\n"}),
    )


def build_archives(shared_data: Path, out: Path) -> Archives:
    """Write every archive into `out`, from the real corpora in `shared_data`."""
    ptb = {name: (shared_data / "ptb" / name).read_bytes() for name in PTB_FILES}
    enwik8 = (shared_data / "enwik8" / "enwik8.head").read_bytes()
    text8 = (shared_data / "text8" / "text8.head").read_bytes()

    def prefix(path: Path, source: Path, fraction: float) -> Path:
        data = source.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return path

    ptb_members = {f"./simple-examples/data/{name}": content for name, content in ptb.items()}
    made = Archives(
        ptb=tgz(out / "simple-examples.tgz", ptb_members),
        enwik8=zipped(out / "enwik8.zip", {"enwik8": enwik8}),
        text8=zipped(out / "text8.zip", {"text8": text8}),
        ptb_truncated=out / "truncated" / "simple-examples.tgz",
        enwik8_corrupt=out / "corrupt" / "enwik8.zip",
        text8_truncated=out / "truncated" / "text8.zip",
        text8_missing_member=zipped(out / "text9.zip", {"text9": text8[:1000]}),
        enwik8_bytes=enwik8,
        text8_bytes=text8,
        folder=out / "extracted",
    )
    for path in (made.ptb_truncated, made.enwik8_corrupt):
        path.parent.mkdir(exist_ok=True)
    prefix(made.ptb_truncated, made.ptb, 0.6)
    prefix(made.text8_truncated, made.text8, 0.9)
    damaged = bytearray(made.enwik8.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(64)  # zeros in the middle of the deflate stream
    made.enwik8_corrupt.write_bytes(bytes(damaged))

    (made.folder / "a" / "b").mkdir(parents=True)
    (made.folder / "a" / "enwik8").write_bytes(enwik8)
    (made.folder / "text8").write_bytes(text8)
    for name, content in ptb.items():
        (made.folder / "a" / "b" / name).write_bytes(content)
    return made


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> CliResult:
    """Run `hmlm ARGS` in this process through cli.main (the error handling of the real command line)."""
    capsys.readouterr()  # drop what came before
    saved = sys.argv
    sys.argv = ["hmlm", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
