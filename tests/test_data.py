"""`hmlm data ptb|text8|enwik8|synthetic`: real archive formats served on 127.0.0.1, through the command line."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import Archives, UnsafeArchives, build_archives, build_unsafe_archives, run_cli
from data_server import DataServer, Fault

import hmlm.data.download as download_module
from hmlm.data import DATASETS, open_dataset, prepare_dataset, prepare_synthetic
from hmlm.data.sources import SOURCES
from hmlm.errors import UserError

PTB_TOKENS = {"train": 5_017_482, "valid": 393_042, "test": 442_423}


@pytest.fixture(scope="session")
def server() -> Iterator[DataServer]:
    with DataServer() as running:
        yield running


@pytest.fixture(scope="session")
def archives(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Archives:
    return build_archives(shared_data, tmp_path_factory.mktemp("archives"))


@pytest.fixture(scope="session")
def unsafe_archives(tmp_path_factory: pytest.TempPathFactory) -> UnsafeArchives:
    return build_unsafe_archives(tmp_path_factory.mktemp("unsafe"))


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "RETRY_WAIT", 0.0)
    monkeypatch.setattr(download_module, "RETRIES", 1)


def leftovers(data_dir: Path, name: str) -> list[str]:
    """Anything a failed preparation of `name` might have left in DATA_DIR (the dataset or its staging)."""
    if not data_dir.exists():
        return []
    return sorted(p.name for p in data_dir.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def symbols_of(dataset, split: str) -> np.ndarray:
    """The split decoded back to raw codes (bytes or code points), to compare with the source file."""
    table = np.array([s if isinstance(s, int) else ord(s) for s in dataset.vocab.symbols])
    return table[np.asarray(dataset.split(split))]


# -- PTB ---------------------------------------------------------------------------------------------------


def test_ptb_from_the_official_archive_format_with_verification(
    server: DataServer, archives: Archives, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = server.serve("/rnnlm/simple-examples.tgz", archives.ptb.read_bytes())
    result = run_cli(capsys, "data", "ptb", "--source", url, "--data-dir", tmp_path)
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    assert "5,017,482 / 393,042 / 442,423 tokens" in result.stdout and "50 symbols (chars)" in result.stdout

    ds = open_dataset("ptb", tmp_path)
    assert {s: len(ds.split(s)) for s in PTB_TOKENS} == PTB_TOKENS
    assert ds.split("train").dtype == np.uint8
    assert len(ds.vocab) == 50 and ds.vocab.kind == "chars" and ds.vocab.space == "_"
    assert ds.vocab.symbols == sorted(ds.vocab.symbols) and ds.vocab.symbols[0] == "\n"
    assert json.loads((tmp_path / "ptb" / "vocab.json").read_text()) == ds.vocab.to_dict()
    meta = json.loads((tmp_path / "ptb" / "meta.json").read_text())
    assert meta == {
        "format_version": 1,
        "dataset": "ptb",
        "dtype": "uint8",
        "vocab_size": 50,
        "splits": {s: {"tokens": n} for s, n in PTB_TOKENS.items()},
        "source": {"name": url, "sha256": meta["source"]["sha256"]},
    }
    shared = Path(archives.folder) / "a" / "b"
    original = b"".join((shared / f"ptb.char.{s}.txt").read_bytes() for s in PTB_TOKENS)
    assert meta["source"]["sha256"] == hashlib.sha256(original).hexdigest()

    # Every split is its file without the separating spaces; the decoded text shows "_" as a space.
    valid = (shared / "ptb.char.valid.txt").read_bytes()
    assert symbols_of(ds, "valid").astype(np.uint8).tobytes() == valid.replace(b" ", b"")
    first_line = valid.split(b"\n")[0].decode().replace(" ", "").replace("_", " ")
    assert ds.vocab.decode(ds.split("valid")[: len(first_line) + 1]) == first_line + "\n"
    assert (tmp_path / "downloads" / "simple-examples.tgz").read_bytes() == archives.ptb.read_bytes()

    # Idempotent: a second run says so and fetches nothing; --force rebuilds from the cached archive.
    requests = len(server.requests_for("/rnnlm/simple-examples.tgz"))
    again = run_cli(capsys, "data", "ptb", "--source", url, "--data-dir", tmp_path)
    assert again.code == 0 and "already prepared" in again.stdout
    forced = run_cli(capsys, "data", "ptb", "--source", url, "--data-dir", tmp_path, "--force")
    assert forced.code == 0 and "wrote" in forced.stdout
    assert len(server.requests_for("/rnnlm/simple-examples.tgz")) == requests
    assert leftovers(tmp_path, "ptb") == ["ptb"]
    assert open_dataset("ptb", tmp_path).meta == meta


def test_interrupted_download_is_resumed_by_the_next_run(
    server: DataServer,
    archives: Archives,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(download_module, "RETRIES", 0)  # so the first run gives up at the cut
    url = server.serve("/resume/simple-examples.tgz", archives.ptb.read_bytes(), Fault(cut_after=3_000_000))
    first = run_cli(capsys, "data", "ptb", "--source", url, "--data-dir", tmp_path)
    assert first.code == 2 and "run the same command again to resume" in first.stderr
    assert (tmp_path / "downloads" / "simple-examples.tgz.part").stat().st_size == 3_000_000
    assert leftovers(tmp_path, "ptb") == []

    second = run_cli(capsys, "data", "ptb", "--source", url, "--data-dir", tmp_path)
    assert second.code == 0, second.stderr
    assert [r.range for r in server.requests_for("/resume/simple-examples.tgz")] == [None, "bytes=3000000-"]
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["simple-examples.tgz"]
    assert len(open_dataset("ptb", tmp_path).split("train")) == PTB_TOKENS["train"]  # verified, so intact


def test_ptb_from_a_folder_of_extracted_files(archives: Archives, tmp_path: Path) -> None:
    path = prepare_dataset("ptb", tmp_path, source=str(archives.folder))  # found two folders down
    assert json.loads((path / "meta.json").read_text())["splits"]["test"] == {"tokens": 442_423}


# -- text8 and enwik8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["enwik8", "text8"])
def test_prefix_archives_split_and_decode_byte_exactly_with_no_verify(
    name: str, server: DataServer, archives: Archives, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = server.serve(f"/dc/{name}.zip", getattr(archives, name).read_bytes())
    result = run_cli(capsys, "data", name, "--source", url, "--data-dir", tmp_path, "--no-verify")
    assert result.code == 0, result.stderr
    assert result.stderr.startswith("warning: --no-verify") and "not checked" in result.stderr

    original = getattr(archives, f"{name}_bytes")
    ds = open_dataset(name, tmp_path)
    held_out = len(original) // 20
    sizes = {s: len(ds.split(s)) for s in ("train", "valid", "test")}
    assert sizes == {"train": len(original) - 2 * held_out, "valid": held_out, "test": held_out}
    decoded = b"".join(symbols_of(ds, s).astype(np.uint8).tobytes() for s in ("train", "valid", "test"))
    assert decoded == original  # valid then test taken from the end, in order
    assert ds.meta["source"]["sha256"] == hashlib.sha256(original).hexdigest()
    assert ds.vocab.space == " " and ds.vocab.symbols == sorted(ds.vocab.symbols)
    if name == "text8":
        assert ds.vocab.kind == "chars" and ds.vocab.symbols == [" ", *"abcdefghijklmnopqrstuvwxyz"]
        assert ds.vocab.decode(ds.split("valid")[:200]) == original[sizes["train"] :][:200].decode()
    else:
        assert ds.vocab.kind == "bytes" and ds.vocab.symbols == sorted(set(original))
        assert ds.vocab.space_id == ds.vocab.symbols.index(32)
        start = sizes["train"] + held_out
        assert ds.vocab.decode(ds.split("test")[:300]) == original[start : start + 300].decode("utf-8", "replace")


def test_enwik8_from_a_local_archive_and_a_folder(archives: Archives, tmp_path: Path) -> None:
    from_zip = open_dataset(
        "enwik8", prepare_dataset("enwik8", tmp_path / "a", str(archives.enwik8), verify=False).parent
    )
    from_dir = open_dataset(
        "enwik8", prepare_dataset("enwik8", tmp_path / "b", str(archives.folder), verify=False).parent
    )
    assert from_zip.meta == {**from_dir.meta, "source": {**from_dir.meta["source"], "name": "enwik8.zip"}}
    assert np.array_equal(from_zip.split("train"), from_dir.split("train"))


def test_official_checksums_reject_a_prefix(
    server: DataServer, archives: Archives, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = server.serve("/mismatch/enwik8.zip", archives.enwik8.read_bytes())
    result = run_cli(capsys, "data", "enwik8", "--source", url, "--data-dir", tmp_path)
    assert result.code == 2
    assert "checksum mismatch" in result.stderr and SOURCES["enwik8"].members[0].sha1 in result.stderr
    assert "--no-verify" in result.stderr
    assert leftovers(tmp_path, "enwik8") == []
    # The archive is kept: a --no-verify run uses it without downloading it again.
    assert (tmp_path / "downloads" / "enwik8.zip").exists()
    assert run_cli(capsys, "data", "enwik8", "--source", url, "--data-dir", tmp_path, "--no-verify").code == 0
    assert len(server.requests_for("/mismatch/enwik8.zip")) == 1


# -- errors: one line on stderr, exit status 2, nothing half-prepared -------------------------------------------


def closed_port() -> int:
    """A port that was free a moment ago: nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plain_error_cases(server: DataServer, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (arguments after `hmlm data`, a fragment the one-line message must hold): no corpora needed."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    return {
        "unknown name": (["wikitext"], "unknown dataset 'wikitext': choose one of ptb, text8, enwik8, synthetic"),
        "404": (["ptb", "--source", server.url("/nowhere/simple-examples.tgz")], "HTTP 404"),
        "refused": (["text8", "--source", f"http://127.0.0.1:{closed_port()}/text8.zip"], "Connection refused"),
        "missing in folder": (["ptb", "--source", str(tmp_path)], "no file named ptb.char.train.txt"),
        "missing source": (["ptb", "--source", str(tmp_path / "nope.tgz")], "no such file or folder"),
        "not writable": (["synthetic", "--data-dir", str(blocked / "data")], "cannot write to the data folder"),
        "source for synthetic": (["synthetic", "--source", str(tmp_path)], "takes no --source"),
        "text option": (["ptb", "--split", "0.8,0.1,0.1"], "--split: only for `hmlm data text FILE`"),
    }


def archive_error_cases(server: DataServer, archives: Archives) -> dict[str, tuple[list[str], str]]:
    """The same for the broken archives built from the real corpora."""
    truncated_url = server.serve("/t/simple-examples.tgz", archives.ptb_truncated.read_bytes())
    return {
        "truncated tgz, downloaded": (["ptb", "--source", truncated_url], "truncated or corrupt"),
        "truncated tgz, local": (["ptb", "--source", str(archives.ptb_truncated)], "truncated or corrupt"),
        "truncated zip": (["text8", "--source", str(archives.text8_truncated)], "truncated or corrupt"),
        "corrupt zip": (["enwik8", "--source", str(archives.enwik8_corrupt), "--no-verify"], "truncated or corrupt"),
        "missing member": (["text8", "--source", str(archives.text8_missing_member)], "no file named text8"),
        "checksum": (["text8", "--source", str(archives.text8)], "checksum mismatch"),
    }


def unsafe_error_cases(unsafe: UnsafeArchives) -> dict[str, tuple[list[str], str]]:
    """The same for the archives holding a path out of their folder, which need no corpus."""
    return {
        "escaping tgz": (
            ["ptb", "--source", str(unsafe.ptb_escaping)],
            "'../../evil.txt': its path escapes the folder",
        ),
        "escaping zip": (
            ["text8", "--source", str(unsafe.text8_escaping), "--no-verify"],
            "'../evil': its path escapes the folder",
        ),
        "link out of the folder": (["ptb", "--source", str(unsafe.ptb_link_out)], "a link to outside the folder"),
    }


PLAIN_CASES = [
    "unknown name",
    "404",
    "refused",
    "missing in folder",
    "missing source",
    "not writable",
    "source for synthetic",
    "text option",
]
ARCHIVE_CASES = [
    "truncated tgz, downloaded",
    "truncated tgz, local",
    "truncated zip",
    "corrupt zip",
    "missing member",
    "checksum",
]
UNSAFE_CASES = ["escaping tgz", "escaping zip", "link out of the folder"]


@pytest.mark.parametrize("case", PLAIN_CASES + UNSAFE_CASES + ARCHIVE_CASES)
def test_errors_are_one_line_exit_2_and_leave_nothing(
    case: str, server: DataServer, tmp_path: Path, capsys: pytest.CaptureFixture, request: pytest.FixtureRequest
) -> None:
    if case in ARCHIVE_CASES:  # only these skip without ../shared/data
        args, fragment = archive_error_cases(server, request.getfixturevalue("archives"))[case]
    elif case in UNSAFE_CASES:
        args, fragment = unsafe_error_cases(request.getfixturevalue("unsafe_archives"))[case]
    else:
        args, fragment = plain_error_cases(server, tmp_path)[case]
    data_dir = tmp_path / "data"
    if "--data-dir" not in args:
        args = [*args, "--data-dir", str(data_dir)]
    result = run_cli(capsys, "data", *args)
    assert result.code == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: --no-verify")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert leftovers(data_dir, args[0]) == []
    if case == "truncated tgz, downloaded":  # a useless download is removed, so the next run fetches it afresh
        assert "it was removed" in lines[0]
        assert list((data_dir / "downloads").iterdir()) == []
    if case.startswith(("truncated tgz, local", "corrupt zip")):  # a user's own archive is never removed
        assert Path(args[args.index("--source") + 1]).exists()


@pytest.mark.parametrize(("name", "archive"), [("ptb", "ptb_escaping"), ("text8", "text8_escaping"),
                                                ("ptb", "ptb_link_out")])  # fmt: skip
def test_escaping_member_is_never_written(unsafe_archives: UnsafeArchives, tmp_path: Path, name: str, archive: str):
    data_dir = tmp_path / "deep" / "data"
    with pytest.raises(UserError, match="holds an unsafe member"):
        prepare_dataset(name, data_dir, source=str(getattr(unsafe_archives, archive)), verify=False)
    assert not any(p.name in ("evil.txt", "evil", "passwd") for p in tmp_path.rglob("*"))
    assert leftovers(data_dir, name) == []


def test_the_real_command_line_prints_one_line_without_traceback(tmp_path: Path) -> None:
    """The whole path: the `python -m hmlm` process, typer, cli.main's handling of UserError."""
    completed = subprocess.run(
        [sys.executable, "-m", "hmlm", "data", "ptb", "--source", str(tmp_path / "missing.tgz")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("error: --source ")
    assert not (tmp_path / "data" / "ptb").exists()


def test_help_explains_the_names(capsys: pytest.CaptureFixture) -> None:
    result = run_cli(capsys, "data", "--help")
    assert result.code == 0
    for name in (*DATASETS, "text"):
        assert name in result.stdout


def test_open_dataset_says_how_to_prepare_a_missing_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match=r"'text8' is not prepared in .*: run `hmlm data text8 --data-dir "):
        open_dataset("text8", tmp_path)
    with pytest.raises(UserError, match=r"run `hmlm data text FILE --name book"):
        open_dataset("book", tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"run `hmlm data ptb`$"):
        open_dataset("ptb")  # the default data folder, relative to the working directory


def test_open_dataset_notices_a_damaged_split(tmp_path: Path) -> None:
    path = prepare_synthetic(tmp_path, chars=10_000)
    with open(path / "valid.bin", "ab") as file:
        file.write(b"\0")
    with pytest.raises(UserError, match=r"valid.bin has .* bytes.*--force"):
        open_dataset("synthetic", tmp_path)
