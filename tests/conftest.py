"""Shared test fixtures: where the real corpora are, and a CPU-friendly torch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HMLM_SHARED_DATA", REPO.parent / "shared" / "data"))

# Tests are many small models: more threads only add contention on a small CI machine.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, the real corpora; tests that need it skip on a fresh clone that lacks it."""
    if not (SHARED_DATA / "ptb" / "ptb.char.valid.txt").exists():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (set HMLM_SHARED_DATA to the shared/data folder)")
    return SHARED_DATA
