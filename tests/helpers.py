"""Helpers shared by the tests: a small config and `hmlm` as a user runs it, for those that train small models;
what "equal in float64" means, for those that compare two paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmlm.config import Config, from_dict
from hmlm.fast.kernels import cpu

SMALL = {
    "model": {"embed_dim": 8, "hidden_sizes": [16, 16, 16], "output_embed_dim": 16},
    "train": {"batch_size": 4, "seq_len": 20, "lr": 0.01, "max_steps": 24, "eval_every": 8, "eval_tokens": 400,
              "log_every": 4, "sample_length": 20},
    "slope": {"schedule": "step", "steps": 24},
}  # fmt: skip


def run_hmlm(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "hmlm", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"hmlm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def small_config(data_dir: Path, **train) -> Config:
    raw = json.loads(json.dumps(SMALL))
    raw["data"] = {"name": "synthetic", "dir": str(data_dir)}
    raw["train"].update(train)
    return from_dict(raw)


def write_config(path: Path, data_dir: Path, **train) -> Path:
    path.write_text(small_config(data_dir, **train).to_yaml())
    return path


def params_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def record_steps(monkeypatch) -> list[int]:
    """The number of every training step run in this process from now on (Trainer.train_step, wrapped): a resumed
    run that continues runs the steps after its checkpoint's only, where one started again would run from 1."""
    from hmlm.training.trainer import Trainer

    steps: list[int] = []
    original = Trainer.train_step

    def train_step(self, *args, **kwargs):
        steps.append(self.schedule.step + 1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return steps


def adam_steps(payload: dict) -> set[int]:
    """The step counts in a checkpoint's Adam state (one per parameter): the steps the optimizer took over the whole
    run, which a resume that lost the optimizer state would start again from 0."""
    return {int(state["step"]) for state in payload["optimizer"]["state"].values()}


# "Equal in float64": to F64_RTOL of each tensor's largest magnitude (at least F64_RTOL absolute), far tighter than
# torch's float64 default of 1e-7. Rounding in a sum is relative to its largest terms, so a gradient element that
# cancels to near zero carries the rounding of terms ~100x its size: measured, the fast path and the reference
# differ by at most ~1e-13 of a tensor's largest element (gradients of size 30-100 by 2-4e-12).
F64_RTOL = 1e-12


def assert_close64(mine: torch.Tensor, theirs: torch.Tensor, msg=None) -> None:
    """Equal in float64, to F64_RTOL of `theirs`' largest magnitude (see F64_RTOL)."""
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    torch.testing.assert_close(mine, theirs, rtol=F64_RTOL, atol=F64_RTOL * scale, msg=msg)


def use_kernels(monkeypatch, backend: str) -> None:
    """Run the fast path on one kernel backend (HMLM_KERNELS: "cpu", "torch" or "triton"); for "cpu", require the
    fused CPU kernels (require_cpu_kernels)."""
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", backend)
    if backend == "cpu":
        require_cpu_kernels()


def require_cpu_kernels() -> None:
    """For a test of the fused CPU kernels: skip where no C++ compiler is installed (no build can work there), and
    fail where one is but the build failed, which would otherwise leave training on the slower path unnoticed."""
    if cpu.load() is not None:
        return
    if cpu.compiler() is None:
        pytest.skip(f"no C++ compiler here, so no fused CPU kernels: {cpu.failure()}")
    pytest.fail(f"the fused CPU kernels failed to build although a C++ compiler is installed: {cpu.failure()}")
