"""`hmlm data text FILE`: your own text, by characters or bytes, and every way it can go wrong."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import run_cli

from hmlm.data import open_dataset, prepare_text
from hmlm.data.text import parse_separator, parse_split
from hmlm.errors import UserError

SAMPLE = "naïve café – 日本語 🙂\nthe quick brown fox jumps over the lazy dog.\n" * 40


def whole_text(dataset) -> str:
    return "".join(dataset.vocab.decode(dataset.split(s)) for s in ("train", "valid", "test"))


def test_non_ascii_text_round_trips_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text(SAMPLE, encoding="utf-8")
    result = run_cli(capsys, "data", "text", tmp_path / "notes.txt", "--data-dir", tmp_path / "data")
    assert result.code == 0, result.stderr
    ds = open_dataset("notes", tmp_path / "data")  # the name defaults to the file's stem
    assert ds.vocab.kind == "chars" and ds.vocab.space == " "
    assert ds.vocab.symbols == sorted(set(SAMPLE))  # whatever the text contains, code point order
    assert whole_text(ds) == SAMPLE
    assert ds.vocab.decode(ds.vocab.encode("日本語 🙂 café")) == "日本語 🙂 café"
    n = len(SAMPLE)
    sizes = [len(ds.split(s)) for s in ("train", "valid", "test")]
    assert sizes == [n - 2 * int(n * 0.05), int(n * 0.05), int(n * 0.05)]
    assert ds.meta["dataset"] == "notes" and ds.meta["dtype"] == "uint8"
    assert ds.meta["source"] == {"name": "notes.txt", "sha256": hashlib.sha256(SAMPLE.encode()).hexdigest()}


def test_byte_level(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text(SAMPLE, encoding="utf-8")
    prepare_text(tmp_path / "notes.txt", name="notes-bytes", data_dir=tmp_path, level="bytes")
    ds = open_dataset("notes-bytes", tmp_path)
    raw = SAMPLE.encode("utf-8")
    assert ds.vocab.kind == "bytes" and ds.vocab.symbols == sorted(set(raw)) and ds.vocab.space == " "
    assert json.loads((tmp_path / "notes-bytes" / "vocab.json").read_text())["symbols"] == sorted(set(raw))
    assert whole_text(ds) == SAMPLE  # split at byte offsets, but whole again when joined
    table = np.array(ds.vocab.symbols, dtype=np.uint8)
    assert b"".join(table[np.asarray(ds.split(s))].tobytes() for s in ("train", "valid", "test")) == raw


def test_binary_files_are_fine_at_byte_level(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 10)
    ds = open_dataset("blob", prepare_text(tmp_path / "blob.bin", data_dir=tmp_path, level="bytes").parent)
    assert len(ds.vocab) == 256 and ds.meta["dtype"] == "uint8"


def test_a_folder_is_its_files_in_sorted_order_with_the_separator(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "b" / "2.txt").write_text("second " * 20)
    (corpus / "a.txt").write_text("first " * 20)
    (corpus / "c.txt").write_text("third " * 20)
    (corpus / ".hidden").write_text("never")
    args = [
        "data",
        "text",
        corpus,
        "--data-dir",
        tmp_path / "data",
        "--separator",
        "\\n\\n",
        "--split",
        "0.5,0.25,0.25",
    ]
    assert run_cli(capsys, *args).code == 0
    ds = open_dataset("corpus", tmp_path / "data")
    expected = "\n\n".join(["first " * 20, "second " * 20, "third " * 20])
    assert whole_text(ds) == expected
    assert len(ds.split("valid")) == int(len(expected) * 0.25)
    assert ds.meta["source"] == {"name": "corpus", "sha256": hashlib.sha256(expected.encode()).hexdigest()}


def test_prepared_text_is_kept_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "t.txt"
    path.write_text("one two three " * 10)
    prepare_text(path, data_dir=tmp_path)
    path.write_text("four five six " * 10)
    capsys.readouterr()
    prepare_text(path, data_dir=tmp_path)
    assert "already prepared" in capsys.readouterr().out
    assert whole_text(open_dataset("t", tmp_path)).startswith("one")
    prepare_text(path, data_dir=tmp_path, force=True)
    assert whole_text(open_dataset("t", tmp_path)).startswith("four")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t", "t.txt"]  # no staging folders left


def test_separator_and_split_parsing() -> None:
    assert parse_separator("\\n") == "\n" and parse_separator("\\t|é") == "\t|é"
    assert parse_split("0.8,0.1,0.1") == (0.8, 0.1, 0.1)


ERRORS = {  # case: (the input, more options, a regular expression the one-line message matches)
    "empty file": (lambda d: d / "empty.txt", [], "is empty"),
    "empty folder files": (lambda d: d / "blank", [], "is empty"),
    "missing file": (lambda d: d / "absent.txt", [], "no such file or folder"),
    "binary file": (lambda d: d / "image.png", [], r"looks binary \(a NUL byte at byte offset 4\)"),
    "not utf-8": (lambda d: d / "latin1.txt", [], r"not UTF-8 text \(byte 0xe9 at byte offset 3\): .*--level bytes"),
    "not utf-8 in a folder": (lambda d: d / "mixed", [], r"mixed/b.txt is not UTF-8 text .*offset 1\b"),
    "split sum": (lambda d: d / "ok.txt", ["--split", "0.9,0.1,0.1"], r"add up to 1\.1, not 1$"),
    "split negative": (lambda d: d / "ok.txt", ["--split", "1.1,-0.05,-0.05"], "three fractions above 0"),
    "split malformed": (lambda d: d / "ok.txt", ["--split", "0.9;0.1"], "give three fractions"),
    "split leaves one empty": (lambda d: d / "short.txt", [], "leaves the valid split 0 of the text's 10 tokens"),
    "level": (lambda d: d / "ok.txt", ["--level", "words"], "choose chars or bytes"),
    "reserved name": (lambda d: d / "ok.txt", ["--name", "ptb"], "name of a built-in dataset"),
    "bad name": (lambda d: d / "ok.txt", ["--name", "../up"], "cannot name a dataset folder"),
    "no file": (None, [], "needs the FILE"),
    "source": (lambda d: d / "ok.txt", ["--source", "http://example.com/x"], "not for `text`"),
}


def make_inputs(folder: Path) -> None:
    (folder / "empty.txt").write_bytes(b"")
    (folder / "blank").mkdir()
    (folder / "blank" / "a.txt").write_bytes(b"")
    (folder / "blank" / "b.txt").write_bytes(b"")
    (folder / "image.png").write_bytes(b"\x89PNG\0\0\0\rIHDR")
    (folder / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (folder / "mixed").mkdir()
    (folder / "mixed" / "a.txt").write_text("fine text " * 10)
    (folder / "mixed" / "b.txt").write_bytes(b"o\xffps")
    (folder / "ok.txt").write_text("enough text for three splits " * 10)
    (folder / "short.txt").write_text("ten chars!")


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_exit_2_and_leave_nothing(case: str, tmp_path: Path, capsys) -> None:
    make_inputs(tmp_path)
    where, options, message = ERRORS[case]
    data_dir = tmp_path / "data"
    args = ["data", "text", *([where(tmp_path)] if where else []), *options, "--data-dir", data_dir]
    result = run_cli(capsys, *args)
    assert result.code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert not data_dir.exists() or list(data_dir.iterdir()) == []


def test_python_api_checks_the_split_too(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("x" * 100)
    with pytest.raises(UserError, match="three fractions above 0"):
        prepare_text(tmp_path / "ok.txt", data_dir=tmp_path, split=(1.0, 0.0, 0.0))
