"""The Triton kernels (hmlm/fast/kernels/triton.py) against the reference, through the public API (HMLSTM, CharLM).

HMLM_KERNELS=triton selects them. Without CUDA they run on the CPU through Triton's interpreter, which is slow,
hence the small shapes; on a machine with CUDA the same tests run them compiled, on the GPU. Every test checks
that the Triton kernels did run (not the torch-op fallback). The comparisons are those of tests/test_model.py
(`compare_with_reference`, `compare_charlm_with_reference`, `run_both`): values and gradients of the
parameters, the input and the initial state, in float64.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import assert_close64
from test_model import (
    F64,
    assert_same,
    compare_charlm_with_reference,
    compare_with_reference,
    loss_of,
    loss_weights,
    make_rnn,
    random_state,
    run_both,
)

from hmlm import CharLM, HMLSTMState, ModelConfig
from hmlm.fast import kernels

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e .[dev] installs it)", allow_module_level=True)

# make gpu-check selects these with the cuda tests (`-m "cuda or triton"`): on a GPU they run compiled, in float64
# and float32 (the check of the compiled kernels that only a GPU can make).
pytestmark = pytest.mark.triton


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """HMLM_KERNELS=triton, and the device the Triton kernels run on in this process (the CPU when interpreted).
    Every backend loaded while HMLM_KERNELS=triton is recorded (a test that sets torch itself, to compare, is
    left out); after the test, the Triton kernels must have been the only one."""
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", "triton")
    module, why = kernels.load_triton()
    if module is None:
        pytest.skip(f"the Triton kernels cannot run here: {why}")
    used = set()
    load = kernels.load

    def recording_load(backend: str):
        if os.environ.get("HMLM_KERNELS") == "triton":
            used.add(backend)
        return load(backend)

    monkeypatch.setattr(kernels, "load", recording_load)
    yield torch.device(module.DEVICE)
    assert used == {"triton"}, f"the fast path ran on {used or 'torch ops'}, not on the Triton kernels"


def on(device: torch.device, rnn, x: torch.Tensor, state: HMLSTMState):
    return rnn.to(device), x.to(device), HMLSTMState(*([t.to(device) for t in part] for part in state))


def names_of(rnn) -> list[str]:
    layers = range(rnn.num_layers)
    return [n for n, _ in rnn.named_parameters()] + ["x"] + [f"state.{p}{i}" for p in "hcz" for i in layers]


# Hidden sizes that differ per layer and are no powers of two (the kernels' blocks are: masked lanes), with a
# wider layer above a narrower one and the other way round; one layer alone (bottom and top at once). The seed's
# cell (hmlm/cell.py: its z on a COPY step, no gradient through the choice of operation) on a few of them.
CASES = [
    ([7, 5, 3], layer_norm, mode, "hmlm")
    for layer_norm in (False, True)
    for mode in ("step", "soft", "sample-eval", "sample-train")
] + [([5], True, "step", "hmlm"), ([5, 9, 6], True, "soft", "hmlm"), ([5, 9, 6], False, "step", "hmlm")]
CASES += [([7, 5, 3], ln, mode, "seed") for ln in (False, True) for mode in ("step", "soft", "sample-train")]
CASE_IDS = [
    "x".join(map(str, sizes)) + ("-ln-" if ln else "-plain-") + mode + ("" if cell == "hmlm" else f"-{cell}")
    for sizes, ln, mode, cell in CASES
]


@pytest.mark.parametrize(("sizes", "layer_norm", "mode", "cell"), CASES, ids=CASE_IDS)
def test_triton_kernels_equal_the_reference(
    device: torch.device, sizes: list[int], layer_norm: bool, mode: str, cell: str
):
    results = compare_with_reference(sizes, layer_norm, mode, B=3, T=5, device=device, cell=cell)
    if len(sizes) > 1 and not mode.startswith("soft"):
        assert 0 < results["fast"][0].boundaries.mean() < 1, "both kinds of step should happen"
    if cell == "seed" and not mode.startswith("soft"):
        assert opened_on_a_copy(results["fast"][0].boundaries), "the seed's boundary on a COPY step should happen"


def opened_on_a_copy(boundaries: torch.Tensor) -> bool:
    """Whether some layer below the top opened a boundary on a step where it copied (z_{t-1} = 0 and the layer
    below's z_t = 0, the initial z aside): what only the seed's cell does. boundaries: (B, T, L - 1), the top's
    (always 0) left out."""
    z_prev, z_below, z = boundaries[:, :-1, 1:], boundaries[:, 1:, :-1], boundaries[:, 1:, 1:]
    return bool(((z_prev == 0) & (z_below == 0) & (z == 1)).any())


def test_without_gradients_equals_the_reference(device: torch.device):
    """Evaluation and sampling keep one slot per layer and no statistics: the kernels' other variant."""
    rnn = make_rnn([7, 5, 3], layer_norm=True).eval()
    x = torch.randn(3, 5, rnn.input_size, dtype=F64)
    rnn, x, state = on(device, rnn, x, random_state(rnn, 3))
    outs = {}
    with torch.no_grad():
        for impl in ("fast", "reference"):
            rnn.impl = impl
            outs[impl] = rnn(x, state)
    for mine, theirs in zip(outs["fast"].hidden, outs["reference"].hidden, strict=True):
        assert_close64(mine, theirs)
    for part_f, part_r in zip(outs["fast"].state, outs["reference"].state, strict=True):
        for mine, theirs in zip(part_f, part_r, strict=True):
            assert_close64(mine, theirs)


def test_charlm_equals_the_reference(device: torch.device):
    compare_charlm_with_reference(layer_norm=True, B=3, T=6, device=device)


@pytest.mark.parametrize("given", ["tensor", "number"])
@pytest.mark.parametrize("mode", ["soft", "step"])
def test_the_slope_reaches_the_kernels_unrounded_in_float64(device: torch.device, mode: str, given: str):
    """The CUDA graph step passes the slope as a 0-dim tensor (hmlm/training/cuda_graph.py), which the kernels read
    through its pointer, in the compute dtype, without a host read; the eager step passes a number, which Triton would
    make a float32 scalar. 1.3 has no float32: rounded to one, the slope would move every soft boundary and
    straight-through gradient by ~1e-8, far above this test's tolerance. Either way the reference's numbers."""
    rnn = make_rnn([7, 5, 3], layer_norm=True, mode=mode)
    x = torch.randn(3, 5, rnn.input_size, dtype=F64)
    state = random_state(rnn, 3)
    if mode == "soft":
        state = HMLSTMState(state.h, state.c, [z * 0.6 for z in state.z])
    rnn, x, state = on(device, rnn, x, state)
    slope = torch.tensor(1.3, dtype=F64, device=device) if given == "tensor" else 1.3
    results = run_both(rnn, x, state, slope=slope)
    assert_same(results, names_of(rnn), rtol=1e-12, atol=1e-12)


@pytest.fixture
def no_tf32():
    """Full float32 matmuls on CUDA (what precision fp32-strict sets), whatever an earlier test set."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def test_float32_soft_boundaries_stay_close_to_the_reference(device: torch.device, no_tf32):
    """float32, where the kernels sum in another order than torch: soft boundaries, so that no boundary flips
    and the two runs stay comparable. Measured against the reference at this shape: ~4e-7 on the values and
    ~5e-6 of the largest gradient (the C++ kernels: ~6e-7 and ~8e-6); the tolerances are ~6x that, far below
    what a wrong term would give."""
    rnn = make_rnn([7, 5, 3], layer_norm=True, mode="soft").float()
    x = torch.randn(3, 5, rnn.input_size)
    state = random_state(rnn, 3)
    state = HMLSTMState(*([t.float() for t in part] for part in state))
    state = HMLSTMState(state.h, state.c, [z * 0.6 for z in state.z])
    results = run_both(*on(device, rnn, x, state))
    (out_f, grads_f), (out_r, grads_r) = results["fast"], results["reference"]
    for mine, theirs in zip(out_f.hidden, out_r.hidden, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=3e-6)
    torch.testing.assert_close(out_f.boundaries, out_r.boundaries, rtol=1e-5, atol=3e-6)
    for name, mine, theirs in zip(names_of(rnn), grads_f, grads_r, strict=True):
        if theirs is None:
            continue
        scale = theirs.abs().max().item()
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=3e-5 * max(scale, 1.0), msg=name)


def test_bf16_autocast_runs_on_the_kernels_with_fp32_state(device: torch.device):
    """Under autocast the matmuls run in bf16 and add into fp32 pre-activations: the kernels see fp32."""
    torch.manual_seed(0)
    model = CharLM(11, ModelConfig(embed_dim=8, hidden_sizes=[6, 5], output_embed_dim=8)).to(device)
    tokens = torch.randint(0, 11, (2, 4), device=device)
    reference = model(tokens)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(tokens)
        loss = out.logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert all(t.dtype == torch.float32 for part in out.state for t in part), "the carried state stays fp32"
    torch.testing.assert_close(out.logits.float(), reference.logits, atol=0.1, rtol=0.1)


def test_the_bf16_arrangement_equals_the_torch_op_loop_under_autocast(device: torch.device, monkeypatch):
    """Under bf16 autocast the kernels add the step's bf16 product into the fp32 pre-activations (addend), write h
    into the bf16 matmul input (h_rec) and ds again in bf16 (ds_mm), and route a bf16 dx: the arithmetic of the
    torch-op loop, which casts and adds with torch ops. The HM-LSTM alone (its outputs are fp32), soft boundaries
    (no boundary flips), a few steps: what differs is the order of fp32 sums in the layer norms, ~1e-7, unless it
    moves a bf16 rounding of a matmul input, which these inputs do not; a wrong term moves everything by ~1e-2."""
    rnn = make_rnn([7, 5, 3], layer_norm=True, mode="soft").float()
    x = torch.randn(3, 5, rnn.input_size)
    state = random_state(rnn, 3)
    state = HMLSTMState(state.h, state.c, [z * 0.6 for z in state.z])
    rnn, x, state = on(device, rnn, x, HMLSTMState(*([t.float() for t in part] for part in state)))
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("HMLM_KERNELS", backend)
        x_ = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = rnn(x_, state, slope=1.3)
        loss = loss_of(out, loss_weights(out))
        results[backend] = (out, torch.autograd.grad(loss, [*rnn.parameters(), x_]))
    monkeypatch.setenv("HMLM_KERNELS", "triton")  # the fixture checks that the Triton kernels ran
    (out_t, grads_t), (out_r, grads_r) = results["triton"], results["torch"]
    assert all(h.dtype == torch.float32 for h in out_t.hidden)
    for mine, theirs in zip([*out_t.hidden, out_t.boundaries], [*out_r.hidden, out_r.boundaries], strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for name, mine, theirs in zip(names_of(rnn)[: len(grads_r)], grads_t, grads_r, strict=True):
        scale = max(theirs.abs().max().item(), 1.0)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_a_triton_that_cannot_compile_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", "triton")
    from hmlm.fast.kernels import triton as module

    def failing_self_test(dtype: torch.dtype):
        raise RuntimeError("Internal Triton PTX codegen error\nptxas fatal   : Value 'sm_999' is not defined")

    monkeypatch.setattr(module, "self_test", failing_self_test)
    monkeypatch.setattr(kernels, "_triton", None)
    monkeypatch.setattr(kernels, "_triton_failed", None)
    monkeypatch.setattr(kernels, "_triton_dtypes", {})
    dev = torch.device(module.DEVICE)
    with pytest.warns(RuntimeWarning, match="the Triton kernels cannot run here .*Value 'sm_999' is not defined"):
        assert kernels.select(dev, torch.float32) == "torch"
    assert "sm_999" in kernels.describe(dev, torch.float32)
    rnn = make_rnn([4, 3], layer_norm=True).float().to(dev)  # still runs, on torch ops, without warning again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnn(torch.randn(2, 3, rnn.input_size, device=dev)).hidden[-1].sum().backward()


def test_the_warning_names_the_kernel_that_does_not_compile_and_why(monkeypatch):
    """The self-test runs each kernel once; a compile error (here: the one a pointer slope once raised) comes back as
    one warning line with the kernel's name and the compiler's reason."""
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", "triton")
    from hmlm.fast.kernels import triton as module

    launch = module._launch

    def failing_launch(kernel, *args):
        if kernel is module._cell_backward:
            raise RuntimeError(
                "at 97:16:\n    a = _slope(slope, zh, SLOPE_PTR)\nReturn type mismatch: fp32 and pointer<fp32>"
            )
        launch(kernel, *args)

    monkeypatch.setattr(module, "_launch", failing_launch)
    monkeypatch.setattr(kernels, "_triton", None)
    monkeypatch.setattr(kernels, "_triton_failed", None)
    monkeypatch.setattr(kernels, "_triton_dtypes", {})
    with pytest.warns(RuntimeWarning) as caught:
        kernels.select(torch.device(module.DEVICE), torch.float32)
    (message,) = [str(w.message) for w in caught]
    assert "kernel _cell_backward: RuntimeError: Return type mismatch: fp32 and pointer<fp32>" in message
    assert "\n" not in message


def run_python(code: str, **env: str) -> str:
    """Run code in a fresh interpreter whose environment has no TRITON_INTERPRET (the tests' conftest sets it)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HMLM_KERNELS", "HMLM_FUSED")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is used only where there is no CUDA")
def test_the_interpreter_is_on_before_torch_imports_triton():
    """torch imports triton under its optimizers (torch._dynamo), and Triton decides on interpreting its own
    library when it is imported: with HMLM_KERNELS=triton, importing hmlm's model first is enough (every command
    does)."""
    describe = "from hmlm.fast import kernels; print(kernels.describe(torch.device('cpu'), torch.float32))"
    code = f"import torch; from hmlm import HMLSTM; import torch._dynamo; {describe}"
    assert run_python(code, HMLM_KERNELS="triton") == "Triton kernels (interpreted on the CPU: TRITON_INTERPRET=1)"


def test_a_triton_imported_before_the_interpreter_was_on_is_caught(monkeypatch):
    """Its library's functions are then compiled-mode ones, which the interpreter cannot call: say what to do."""
    module, why = kernels.load_triton()
    if module is None or not module.INTERPRETED:
        pytest.skip(f"the Triton kernels are not interpreted here: {why or module.MODE}")
    import triton.language

    monkeypatch.setattr(triton.language, "sum", object())  # as a triton imported without TRITON_INTERPRET has it
    spec = importlib.util.find_spec("hmlm.fast.kernels.triton_kernels")
    fresh = importlib.util.module_from_spec(spec)  # a copy, run anew; the loaded module stays as it is
    with pytest.raises(ImportError, match="set TRITON_INTERPRET=1 \\(or HMLM_KERNELS=triton\\) in the environment"):
        spec.loader.exec_module(fresh)
