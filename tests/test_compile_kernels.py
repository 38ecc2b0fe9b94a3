"""The ahead-of-time compile check (tools/compile_kernels.py): every Triton kernel variant that hmlm launches,
compiled for sm_80 and sm_90 with Triton's compiler and ptxas, on this machine without a GPU. It binds Triton
internals, so it runs only with the Triton versions it is tested with; in CI (CI set) any other is a failure,
never a skip, since `make install` chooses the version there."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import compile_kernels  # noqa: E402

IN_CI = bool(os.environ.get("CI"))


def skip_or_fail(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"the compile check must run in CI: {reason}")
    pytest.skip(reason)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm80_and_sm90_without_spills(tmp_path):
    if importlib.util.find_spec("triton") is None:
        skip_or_fail("triton is not installed (pip install -e .[dev] installs it)")
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HMLM_KERNELS", "HMLM_FUSED")}
    done = subprocess.run([sys.executable, str(REPO / "tools" / "compile_kernels.py"), "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    if done.returncode == compile_kernels.UNTESTED_EXIT:
        skip_or_fail(done.stderr.strip())
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    targets = {r["target"] for r in results}
    assert targets == {"sm_80", "sm_90"}
    assert all(r["ok"] for r in results)
    seen = {(r["kernel"], r["variant"]["dtype"]) for r in results}
    for kernel in ("_cell_forward", "_cell_backward", "_route_backward"):
        assert {(kernel, "float32"), (kernel, "float64")} <= seen
    forward = [r["variant"] for r in results if r["kernel"] == "_cell_forward"]
    assert {v["ZRAW_MODE"] for v in forward} == {0, 1, 2}  # step, soft, sample (drawn in training)
    assert {v["SLOPE_PTR"] for v in forward} == {False, True}  # a number and a tensor (the CUDA graph's)
    assert any(v["ADDEND"] for v in forward) and any(not v["STATS"] for v in forward)  # bf16; evaluation
    backward = [r["variant"] for r in results if r["kernel"] == "_cell_backward"]
    assert any(v["SEED"] for v in forward) and any(v["SEED"] for v in backward)  # model.cell: seed
    assert all(r["registers"] and r["spill_stores"] == 0 for r in results if r["target"] == "sm_90"
               and r["variant"]["dtype"].startswith("float32"))  # fmt: skip
