"""The fused CPU kernels (hmlm/fast/kernels/cpu.py): built where a compiler is, imported without the builder once built,
a clear fallback where they cannot be built (and a non-zero exit status from `python -m hmlm.fast.kernels.cpu`, which
make install runs), and the float32 build (AVX2/FMA where the CPU has it) against the reference. tests/test_model.py
runs every model test with and without them, in float64. A test that needs them skips only where no C++ compiler is
installed: where one is, a failed build fails it (helpers.require_cpu_kernels)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import require_cpu_kernels
from torch.utils import cpp_extension

from hmlm import HMLSTM
from hmlm.errors import UserError
from hmlm.fast import kernels
from hmlm.fast.kernels import cpu as fused


@pytest.fixture
def fresh_state(monkeypatch):
    """fused.load() as in a new process: nothing loaded and no failure noted."""
    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_failed", None)


def test_the_kernels_build_where_there_is_a_compiler(capsys):
    """Where a C++ compiler is installed the build must work: otherwise training silently runs the slower path."""
    require_cpu_kernels()
    assert fused.main([]) == 0
    assert capsys.readouterr().out.startswith("hmlm: fused CPU kernels ready: ")


def test_a_failed_build_exits_non_zero(tmp_path):
    """`python -m hmlm.fast.kernels.cpu` (make install's last step) with a compiler that does not exist, into an empty
    build folder: exit status 1, and a line that says why."""
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    done = subprocess.run([sys.executable, "-m", "hmlm.fast.kernels.cpu"], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "hmlm: fused CPU kernels not built (no C++ compiler found: install g++, or name one in CXX)" in done.stderr
    assert "ready" not in done.stdout


def test_a_built_extension_is_imported_without_the_builder(fresh_state, monkeypatch):
    require_cpu_kernels()
    monkeypatch.setattr(fused, "_module", None)

    def no_builder(*args, **kwargs):
        raise AssertionError("torch's builder was called for an extension that is already built")

    monkeypatch.setattr(cpp_extension, "load", no_builder)
    module = fused.load()
    assert module is not None and callable(module.cell_forward)


def test_a_failed_build_falls_back_to_torch_ops_with_one_warning(fresh_state, monkeypatch, capsys):
    def failing_build(verbose: bool = False):
        raise RuntimeError("Error building extension 'hmlm_cell_cpu'\nc++: not found")

    monkeypatch.setattr(fused, "build", failing_build)
    with pytest.warns(RuntimeWarning, match="could not build the fused CPU kernels .*c\\+\\+: not found"):
        assert fused.load() is None
    assert fused.main([]) == 1  # what `python -m hmlm.fast.kernels.cpu` exits with
    assert "hmlm: fused CPU kernels not built" in capsys.readouterr().err
    assert kernels.select(torch.device("cpu"), torch.float32) == "torch"
    assert "c++: not found" in fused.failure()
    rnn = HMLSTM(4, [5, 3], layer_norm=True)  # and the model still runs, on torch ops, without warning again
    rnn(torch.randn(2, 3, 4)).hidden[-1].sum().backward()


def test_a_failed_build_fails_the_tests_that_need_it_unless_no_compiler_is_installed(fresh_state, monkeypatch):
    def failing_build(verbose: bool = False):
        raise RuntimeError("cell_cpu.cpp:1:1: error: a compile error")

    monkeypatch.setattr(fused, "build", failing_build)
    monkeypatch.setattr(fused, "compiler", lambda: "/usr/bin/c++")
    with pytest.warns(RuntimeWarning), pytest.raises(pytest.fail.Exception, match="although a C.. compiler is"):
        require_cpu_kernels()
    monkeypatch.setattr(fused, "compiler", lambda: None)
    with pytest.raises(pytest.skip.Exception, match="no C.. compiler here"):
        require_cpu_kernels()


def test_hmlm_fused_0_turns_them_off(monkeypatch):
    monkeypatch.delenv("HMLM_KERNELS", raising=False)
    monkeypatch.setenv("HMLM_FUSED", "0")
    assert kernels.select(torch.device("cpu"), torch.float32) == "torch"
    assert kernels.describe(torch.device("cpu"), torch.float32) == "torch ops (HMLM_FUSED=0)"
    monkeypatch.setenv("HMLM_KERNELS", "auto")
    assert kernels.describe(torch.device("cpu"), torch.float32) == "torch ops (HMLM_FUSED=0)"
    monkeypatch.setenv("HMLM_KERNELS", "cpu")  # the newer switch wins
    assert kernels.select(torch.device("cpu"), torch.float32) == ("cpu" if fused.load() else "torch")


def test_hmlm_kernels_chooses_the_backend(monkeypatch):
    cpu_, f32 = torch.device("cpu"), torch.float32
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", "torch")
    assert kernels.select(cpu_, f32) == "torch"
    assert kernels.describe(cpu_, f32) == "torch ops (HMLM_KERNELS=torch)"
    for setting in ("auto", "cpu", "", "CPU"):
        monkeypatch.setenv("HMLM_KERNELS", setting)
        assert kernels.select(cpu_, f32) == ("cpu" if fused.load() else "torch"), setting
        assert kernels.select(cpu_, torch.bfloat16) == "torch"  # the fused kernels take float32/float64 only
    assert "not torch.bfloat16" in kernels.describe(cpu_, torch.bfloat16)
    monkeypatch.setenv("HMLM_KERNELS", "cuda")
    with pytest.raises(UserError, match="HMLM_KERNELS='cuda' is not a kernel backend: use auto, triton, cpu or torch"):
        kernels.select(cpu_, f32)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_float32_kernels_match_the_reference(layer_norm: bool, monkeypatch):
    """tests/test_model.py holds the kernels to the reference in float64; this is the float32 build, vectorized
    differently (FMA, sums in a different order), at a size where the vector loops have full lanes and tails."""
    require_cpu_kernels()
    monkeypatch.setenv("HMLM_KERNELS", "cpu")
    torch.manual_seed(0)
    rnn = HMLSTM(24, [67, 40, 33], layer_norm=layer_norm)
    x = torch.randn(9, 20, 24)
    results = {}
    for impl in ("fast", "reference"):
        rnn.impl = impl
        rnn.zero_grad()
        out = rnn(x, slope=2.0)
        loss = sum((h * torch.linspace(-1, 1, h.shape[-1])).sum() for h in out.hidden)
        loss.backward()
        results[impl] = (out, {name: p.grad.clone() for name, p in rnn.named_parameters()})
    (out_f, grads_f), (out_r, grads_r) = results["fast"], results["reference"]
    assert torch.equal(out_f.boundaries, out_r.boundaries)
    assert 0 < out_f.boundaries.mean() < 1  # both kinds of step happen
    # float32 rounding, through 20 steps of layer norm: the torch-op path differs from the reference by ~2e-5 too
    for mine, theirs in zip(out_f.hidden, out_r.hidden, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-4)
    for name, theirs in grads_r.items():
        torch.testing.assert_close(grads_f[name], theirs, rtol=1e-3, atol=1e-4 * theirs.abs().max().item(), msg=name)


def test_a_failed_build_is_summed_up_by_the_compilers_first_error():
    output = (
        "Error building extension 'hmlm_cell_cpu':\n[1/2] c++ -MMD ... -c cell_cpu.cpp\n"
        "cell_cpu.cpp:455:45: error: cannot bind non-const lvalue reference\ncell_cpu.cpp:469:38: error: ambiguous\n"
        "ninja: build stopped: subcommand failed."
    )
    assert fused.summarize(RuntimeError(output)) == (
        "RuntimeError: cell_cpu.cpp:455:45: error: cannot bind non-const lvalue reference"
    )
    assert fused.summarize(OSError("ninja is required\nto load C++ extensions")) == "OSError: to load C++ extensions"
