"""Checkpoint files: which file a run directory, its checkpoints/ folder or a path names, and the atomic write
(a temporary file in the same folder, renamed over the old one only once it is complete)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hmlm import checkpoint
from hmlm.checkpoint import resolve_checkpoint, save_checkpoint
from hmlm.errors import UserError


def run_with(tmp_path: Path, *names: str) -> Path:
    """A run directory whose checkpoints/ holds the named files (their content does not matter here)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in names:
        (run / "checkpoints" / name).write_bytes(b"x")
    return run


def test_a_run_directory_and_its_checkpoints_folder_name_the_same_file(tmp_path: Path):
    run = run_with(tmp_path, "best.pt", "last.pt")
    folder = run / "checkpoints"
    for given in (run, folder, str(folder) + "/"):
        assert resolve_checkpoint(given) == folder / "best.pt"
        assert resolve_checkpoint(given, "last") == folder / "last.pt"
    assert resolve_checkpoint(folder / "last.pt") == folder / "last.pt"  # a file, as given


def test_best_falls_back_to_last_before_the_first_evaluation(tmp_path: Path):
    run = run_with(tmp_path, "last.pt")
    assert resolve_checkpoint(run) == run / "checkpoints" / "last.pt"
    assert resolve_checkpoint(run / "checkpoints") == run / "checkpoints" / "last.pt"


def test_a_folder_without_checkpoints_is_one_clear_error(tmp_path: Path):
    empty = run_with(tmp_path)
    for given in (empty, empty / "checkpoints"):
        with pytest.raises(UserError, match=r"holds no checkpoint best.pt: pass a run directory .*checkpoints/"):
            resolve_checkpoint(given)
    with pytest.raises(UserError, match="--checkpoint must be one of best, last, not 'first'"):
        resolve_checkpoint(run_with(tmp_path / "other", "best.pt"), "first")
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_is_renamed_into_place_from_a_temporary_file_beside_it(tmp_path: Path, monkeypatch):
    target = tmp_path / "checkpoints" / "last.pt"
    renames: list[tuple[Path, Path, bool]] = []  # (from, to, the temporary file complete when renamed)
    replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst), torch.load(src, weights_only=True) == {"step": 3}))
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    save_checkpoint(target, {"step": 3})
    [(src, dst, complete)] = renames
    assert dst == target and src.parent == target.parent and src.name.startswith(".last.pt.")  # same file system
    assert complete, "the temporary file held the whole checkpoint before the rename"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's private one


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=repr)
def test_a_failed_write_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path: Path, monkeypatch, failure):
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})
    before = target.read_bytes()
    save = torch.save

    def fails_halfway(payload, file):
        save(payload, file)  # the bytes are written into the temporary file, then the write fails
        assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
        raise failure

    monkeypatch.setattr(checkpoint.torch, "save", fails_halfway)
    with pytest.raises(type(failure)):
        save_checkpoint(target, {"step": 2})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
