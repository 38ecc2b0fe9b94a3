"""Shared test fixtures: where the real corpora are, and a CPU-friendly torch."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run many tiny models, where a second intra-op thread only adds synchronization (a 4x256 layer_norm
# took 6x longer with 2 threads than with 1 on a loaded 2-core machine). Set before torch is imported, so the
# `hmlm` subprocesses that tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The `hmlm` subprocesses that tests start import this checkout's package, not one installed from elsewhere (a
# subprocess run from a temporary folder would otherwise find whichever checkout `pip install -e` pointed at).
_CHECKOUT = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_CHECKOUT, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HMLM_SHARED_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Without CUDA the Triton kernels' tests run them through Triton's interpreter, which must be on before triton is
# imported, and torch imports it under its optimizers (so an earlier test that trains would): on from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, the real corpora; tests that need it skip on a fresh clone that lacks it."""
    if not (SHARED_DATA / "ptb" / "ptb.char.valid.txt").exists():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (set HMLM_SHARED_DATA to the shared/data folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic corpus, prepared once for the session (modules that need their own copy define their own)."""
    from hmlm.data import prepare_dataset

    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data
