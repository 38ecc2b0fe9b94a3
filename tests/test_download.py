"""download(): streamed, resumed with Range after an interruption, retried, atomic; against a local server."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from data_server import DataServer, Fault

import hmlm.data.download as download_module
from hmlm.data.download import download
from hmlm.errors import UserError

CONTENT = random.Random(0).randbytes(2_500_003)  # a few reads of CHUNK bytes, an odd size


@pytest.fixture(scope="module")
def server() -> Iterator[DataServer]:
    with DataServer() as running:
        yield running


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "RETRY_WAIT", 0.0)
    monkeypatch.setattr(download_module, "TIMEOUT", 5.0)


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_download_writes_the_file_and_no_part(server: DataServer, tmp_path: Path) -> None:
    url = server.serve("/plain.bin", CONTENT)
    dest = tmp_path / "downloads" / "plain.bin"
    assert download(url, dest) == dest
    assert dest.read_bytes() == CONTENT
    assert not part_of(dest).exists()
    assert [r.range for r in server.requests_for("/plain.bin")] == [None]


def test_existing_file_is_not_downloaded_again(server: DataServer, tmp_path: Path) -> None:
    url = server.serve("/cached.bin", CONTENT)
    dest = tmp_path / "cached.bin"
    dest.write_bytes(b"already here")
    download(url, dest)
    assert dest.read_bytes() == b"already here"
    assert server.requests_for("/cached.bin") == []


def test_dropped_connection_resumes_with_a_range_request(server: DataServer, tmp_path: Path) -> None:
    url = server.serve("/dropped.bin", CONTENT, Fault(cut_after=1_000_000))
    dest = tmp_path / "dropped.bin"
    download(url, dest)
    assert dest.read_bytes() == CONTENT
    assert [r.range for r in server.requests_for("/dropped.bin")] == [None, "bytes=1000000-"]


def test_interrupted_run_keeps_the_part_and_the_next_run_resumes(
    server: DataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.serve("/interrupted.bin", CONTENT, Fault(cut_after=700_000))
    dest = tmp_path / "interrupted.bin"
    monkeypatch.setattr(download_module, "RETRIES", 0)
    with pytest.raises(UserError, match=r"700,000 bytes received are kept in .*interrupted.bin.part.*resume"):
        download(url, dest)
    assert not dest.exists()
    assert part_of(dest).read_bytes() == CONTENT[:700_000]

    download(url, dest)  # the next run
    assert dest.read_bytes() == CONTENT
    assert not part_of(dest).exists()
    assert [r.range for r in server.requests_for("/interrupted.bin")] == [None, "bytes=700000-"]


def test_server_ignoring_range_makes_the_download_start_over(server: DataServer, tmp_path: Path) -> None:
    url = server.serve("/norange.bin", CONTENT, Fault(ignore_range=True))
    dest = tmp_path / "norange.bin"
    part_of(dest).write_bytes(b"x" * 1000)  # not a prefix of CONTENT: must not survive
    download(url, dest)
    assert dest.read_bytes() == CONTENT
    assert [r.range for r in server.requests_for("/norange.bin")] == ["bytes=1000-"]


def test_complete_part_file_is_accepted_on_416(server: DataServer, tmp_path: Path) -> None:
    url = server.serve("/whole.bin", CONTENT)
    dest = tmp_path / "whole.bin"
    part_of(dest).write_bytes(CONTENT)  # the previous run was killed just before the rename
    download(url, dest)
    assert dest.read_bytes() == CONTENT
    assert [r.range for r in server.requests_for("/whole.bin")] == [f"bytes={len(CONTENT)}-"]


def test_stalled_connection_times_out_and_is_retried(
    server: DataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download_module, "TIMEOUT", 0.3)
    url = server.serve("/stall.bin", CONTENT, Fault(stall=1.5))
    dest = tmp_path / "stall.bin"
    download(url, dest)
    assert dest.read_bytes() == CONTENT
    assert len(server.requests_for("/stall.bin")) == 2


def test_server_error_is_retried(server: DataServer, tmp_path: Path) -> None:
    url = server.serve("/busy.bin", CONTENT, Fault(status=503), Fault(status=500))
    dest = tmp_path / "busy.bin"
    download(url, dest)
    assert dest.read_bytes() == CONTENT
    assert len(server.requests_for("/busy.bin")) == 3


def test_retries_are_bounded(server: DataServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "RETRIES", 2)
    url = server.serve("/down.bin", CONTENT, *[Fault(status=503)] * 5)
    with pytest.raises(UserError, match=r"HTTP 503.*3 tries"):
        download(url, tmp_path / "down.bin")
    assert len(server.requests_for("/down.bin")) == 3


def test_404_fails_at_once(server: DataServer, tmp_path: Path) -> None:
    dest = tmp_path / "missing.bin"
    with pytest.raises(UserError, match=r"HTTP 404.*--source"):
        download(server.url("/missing.bin"), dest)
    assert len(server.requests_for("/missing.bin")) == 1
    assert not dest.exists() and not part_of(dest).exists()


def test_refused_connection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download_module, "RETRIES", 1)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dest = tmp_path / "refused.bin"
    with pytest.raises(UserError, match=r"Connection refused, 2 tries.*--source"):
        download(f"http://127.0.0.1:{port}/x.bin", dest)
    assert not dest.exists() and not part_of(dest).exists()
