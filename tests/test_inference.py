"""Inference that skips COPY (hmlm/fast/copy_skip.py) against the path without it (HMLM_SKIP_COPY=0): the same values
in float64; the same boundaries, BPC and sampled text in float32; on untrained models whose boundaries are made
rare (as a trained model's upper layers are) and on a trained one, in every boundary mode, layer norm on and off,
with the fused C++ kernels and with torch ops; and once with the Triton kernels through Triton's interpreter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close64, small_config, use_kernels

from hmlm import CharLM, ModelConfig, fast
from hmlm.analysis.evaluate import evaluate
from hmlm.analysis.sample import generate_ids
from hmlm.analysis.stepper import Stepper, stepper_for
from hmlm.data import prepare_dataset
from hmlm.fast import copy_skip, forward, kernels
from hmlm.model.charlm import projected_input
from hmlm.training.trainer import train

F64 = torch.float64
VOCAB = 11


@pytest.fixture(autouse=True, params=["cpu", "torch"])
def fast_kernels(request, monkeypatch):
    """Every test runs with the C++ CPU kernels and with torch ops (as on CUDA without Triton): two backends."""
    use_kernels(monkeypatch, request.param)
    return request.param


def sparse_lm(layer_norm: bool, mode: str, dtype=torch.float32, sizes=(12, 10, 8), seed: int = 0) -> CharLM:
    """An untrained CharLM, every parameter perturbed, its boundary detectors biased towards 0 so that the upper
    layers copy on most steps, as in a trained model."""
    torch.manual_seed(seed)
    config = ModelConfig(
        embed_dim=6, hidden_sizes=list(sizes), output_embed_dim=9, layer_norm=layer_norm, boundary=mode
    )
    model = CharLM(VOCAB, config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        for layer, H in enumerate(sizes[:-1]):
            model.rnn.bias[layer][4 * H] -= 1.0 + 0.5 * layer  # zhat's bias
    return model


def both(model: CharLM, monkeypatch, fn):
    """fn() without skipping, then with it; the second also returns what copy_skip.COUNTS saw."""
    monkeypatch.setenv("HMLM_SKIP_COPY", "0")
    plain = fn()
    monkeypatch.setenv("HMLM_SKIP_COPY", "1")
    copy_skip.COUNTS.reset()
    skipping = fn()
    return plain, skipping, copy_skip.COUNTS.fractions()


def forward_twice(model: CharLM, tokens: torch.Tensor, slope: float = 1.0):
    """Two calls with the state carried, as evaluation makes them."""
    with torch.no_grad():
        first = model(tokens[:, :7], slope=slope)
        second = model(tokens[:, 7:], first.state, slope=slope)
    return first, second


def assert_outputs_equal(plain, skipping, exact: bool) -> None:
    """The same boundaries; the same logits, gates and state bit for bit (exact), or equal in float64."""
    for a, b in zip(plain, skipping, strict=True):
        assert torch.equal(a.boundaries, b.boundaries)
        states = zip([*a.state.h, *a.state.c], [*b.state.h, *b.state.c], strict=True)
        values = [(a.logits, b.logits), (a.gates, b.gates), *states]
        for mine, theirs in values:
            if exact:
                assert torch.equal(mine, theirs)
            else:
                assert_close64(mine, theirs)


@pytest.mark.parametrize("mode", ["step", "sample", "soft"])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_a_sequence_equals_the_path_without_skipping_in_float64(mode, layer_norm, batch, monkeypatch):
    """One stream skips a layer that copies; a batch gathers the rows that compute, wherever some copy
    (GATHER_FRACTION 1.0: the default sizes would not gather at this small size, and the run would be the path
    without skipping, compared with itself). The counts show the skipping in every case. The slope, 2.1, has no
    float32 value: soft boundaries read it unrounded on both paths."""
    monkeypatch.setattr(copy_skip, "GATHER_FRACTION", 1.0)
    model = sparse_lm(layer_norm, mode, F64)
    if mode == "soft":  # z = hard_sigm(zhat) is exactly 0 only below -1/slope: push the detectors there
        with torch.no_grad():
            for layer, H in enumerate(model.rnn.hidden_sizes[:-1]):
                model.rnn.bias[layer][4 * H] -= 1.5
    tokens = torch.randint(0, VOCAB, (batch, 20), generator=torch.Generator().manual_seed(1))
    plain, skipping, counts = both(model, monkeypatch, lambda: forward_twice(model, tokens, slope=2.1))
    assert_outputs_equal(plain, skipping, exact=False)
    assert counts["copy"][0] == 0 and counts["skipped"][0] == 0  # layer 1 never copies
    assert min(counts["copy"][1:]) > 0.2  # the upper layers copy often...
    assert min(counts["skipped"][1:]) > 0.1  # ...and skip it


@pytest.mark.parametrize("mode", ["step", "sample"])
def test_a_batch_that_gathers_on_some_steps_and_not_on_others_equals_the_path_without_skipping(mode, monkeypatch):
    """GATHER_FRACTION 0.5: a layer step gathers where at most half of the 8 rows compute, and runs on the full batch
    where more do, so one layer's state passes between both kinds of step within a sequence. Equal in float64."""
    monkeypatch.setattr(copy_skip, "GATHER_FRACTION", 0.5)
    steps = {"gathered": 0, "full": 0}  # upper-layer steps with skipping on
    gathered_step, layer_step = copy_skip.SkippingStep.gathered_step, forward.layer_step

    def gathered(self, *args):
        steps["gathered"] += 1
        return gathered_step(self, *args)

    def full(plan, tape, below, *args):
        steps["full"] += below is not None and copy_skip.enabled()
        return layer_step(plan, tape, below, *args)

    monkeypatch.setattr(copy_skip.SkippingStep, "gathered_step", gathered)
    monkeypatch.setattr(forward, "layer_step", full)  # where copy_skip and forward_sequence read it
    model = sparse_lm(True, mode, F64)
    tokens = torch.randint(0, VOCAB, (8, 20), generator=torch.Generator().manual_seed(1))
    plain, skipping, counts = both(model, monkeypatch, lambda: forward_twice(model, tokens))
    assert_outputs_equal(plain, skipping, exact=False)
    assert steps["gathered"] > 0 and steps["full"] > 0, steps
    assert min(counts["skipped"][1:]) > 0.1


def use_engine(engine: str, monkeypatch) -> None:
    """The gates' matmuls of an inference call on MKL (what small models get) or on oneDNN (large ones: forward.py)."""
    monkeypatch.setattr(forward, "ONEDNN_MIN_WEIGHT", 0 if engine == "onednn" else float("inf"))


def count_onednn(monkeypatch) -> list[int]:
    """[step matmuls of forward.matmul_add ([gates | zhat] in one), those on oneDNN], from now on."""
    calls = [0, 0]
    matmul_add = forward.matmul_add

    def counted(base, x, w_t, out):
        calls[0] += out.shape[1] > 1
        calls[1] += isinstance(w_t, forward.OneDNNWeight)
        matmul_add(base, x, w_t, out)

    monkeypatch.setattr(forward, "matmul_add", counted)
    return calls


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("engine", ["mkl", "onednn"])
def test_a_sequence_is_the_same_in_float32(layer_norm, batch, engine, monkeypatch):
    """Skipping a layer leaves every other number as it was; gathered rows are padded so that the matmul computes
    each of them as in the full batch (ROW_BLOCK); on oneDNN too, which a batch of one never uses."""
    monkeypatch.setattr(copy_skip, "GATHER_FRACTION", 1.0)
    use_engine(engine, monkeypatch)
    calls = count_onednn(monkeypatch)
    model = sparse_lm(layer_norm, "step", sizes=(32, 24, 16))
    tokens = torch.randint(0, VOCAB, (batch, 30), generator=torch.Generator().manual_seed(2))
    plain, skipping, counts = both(model, monkeypatch, lambda: forward_twice(model, tokens))
    assert_outputs_equal(plain, skipping, exact=True)
    assert min(counts["skipped"][1:]) > 0.1
    on_onednn = engine == "onednn" and batch > 1
    assert calls[0] > 0 and calls[1] == (calls[0] if on_onednn else 0)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_onednn_gates_equal_mkl_s_up_to_rounding(layer_norm, monkeypatch):
    """An inference call's gates on oneDNN and on MKL: the same function (soft boundaries: no z can flip); in
    float64 oneDNN is never used, and training (a tape kept) stays on MKL."""
    model = sparse_lm(layer_norm, "soft", sizes=(32, 24, 16))
    tokens = torch.randint(0, VOCAB, (8, 30), generator=torch.Generator().manual_seed(9))
    outputs = {}
    for engine in ("mkl", "onednn"):
        use_engine(engine, monkeypatch)
        outputs[engine] = forward_twice(model, tokens)
    for a, b in zip(outputs["mkl"], outputs["onednn"], strict=True):
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(a.boundaries, b.boundaries)
    calls = count_onednn(monkeypatch)
    forward_twice(model.to(F64), tokens.clone())
    model(tokens).logits.sum().backward()
    assert calls[0] > 0 and calls[1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_input_table_is_the_model_s_projection(dtype, monkeypatch):
    """Layer 1's input without gradient on the CPU, skipping or not: rows of a table of every symbol's projection,
    the model's matmul over the embedded tokens up to rounding; made again when the parameters change."""
    model = sparse_lm(True, "step", dtype, sizes=(32, 24, 16))
    w_in, b_in, *_ = model.rnn.fast_parameters()
    tokens = torch.randint(0, VOCAB, (8, 30), generator=torch.Generator().manual_seed(10))
    for skip in ("1", "0"):
        monkeypatch.setenv("HMLM_SKIP_COPY", skip)
        with torch.no_grad():
            table = projected_input(model, tokens)
            torch.testing.assert_close(table, F.linear(model.embedding(tokens).transpose(0, 1), w_in, b_in))
            model.embedding.weight.add_(0.1)  # (the next round must see a new table)
    assert projected_input(model, tokens) is None  # with gradients: the model's matmul
    model.rnn.impl = "reference"
    with torch.no_grad():
        assert projected_input(model, tokens) is None


@pytest.mark.parametrize("mode", ["step", "sample", "soft"])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sampling_gives_the_same_text(mode, layer_norm, dtype, monkeypatch):
    model = sparse_lm(layer_norm, mode, dtype)

    def sample() -> list[int]:
        return list(generate_ids(model, [1, 2, 3], 200, generator=torch.Generator().manual_seed(5)))

    plain, skipping, counts = both(model, monkeypatch, sample)
    assert plain == skipping
    assert min(counts["skipped"][1:]) > 0.2


def test_the_stepper_equals_a_model_call_per_symbol(monkeypatch):
    """Logits and state after every symbol, in float64, against the model's own call with the state carried; from
    a random state with no boundary, so that the upper layers copy on the first step, before their projection P_l
    was ever made."""
    monkeypatch.setenv("HMLM_SKIP_COPY", "1")
    model = sparse_lm(True, "step", F64)
    symbols = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    torch.manual_seed(8)
    zeros = model.initial_state(1)
    state = zeros._replace(h=[torch.randn_like(h) for h in zeros.h], c=[torch.randn_like(c) for c in zeros.c])
    stepper = Stepper(model, state)
    copy_skip.COUNTS.reset()
    for t, symbol in enumerate(symbols):
        logits = stepper.step(symbol)  # (no torch.no_grad needed: it holds no parameter)
        assert not logits.requires_grad
        if t == 0:
            assert copy_skip.COUNTS.skipped[1:] == [1, 1]
        with torch.no_grad():
            out = model(torch.tensor([[symbol]]), state)
        state = out.state
        torch.testing.assert_close(logits, out.logits[:, -1])
        for layer, tape in enumerate(stepper.tapes):
            torch.testing.assert_close(tape.h_t[stepper.slot], state.h[layer])
            torch.testing.assert_close(tape.c_t[stepper.slot], state.c[layer])
            torch.testing.assert_close(tape.z_t[stepper.slot], state.z[layer])


def test_skipping_runs_the_triton_kernels_on_the_cpu(fast_kernels, monkeypatch):
    """HMLM_KERNELS=triton without CUDA (the interpreter): the gathered rows and the Stepper's layer steps go through
    the same dispatcher (forward.cell_step), so skipping runs the Triton step and equals the path without it."""
    if fast_kernels != "cpu":
        pytest.skip("runs once, under its own HMLM_KERNELS=triton")
    monkeypatch.setenv("HMLM_KERNELS", "triton")
    cpu = torch.device("cpu")
    if kernels.select(cpu, F64) != "triton":
        pytest.skip(f"the Triton kernels do not run here: {kernels.describe(cpu, F64)}")
    monkeypatch.setattr(copy_skip, "GATHER_FRACTION", 1.0)
    model = sparse_lm(True, "step", F64, sizes=(8, 6, 4))
    assert model.rnn.fast_plan(cpu, F64).kernels == "triton"
    tokens = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(6))
    plain, skipping, counts = both(model, monkeypatch, lambda: forward_twice(model, tokens))
    assert_outputs_equal(plain, skipping, exact=False)
    assert min(counts["skipped"][1:]) > 0.1

    def sample() -> list[int]:
        return list(generate_ids(model, [1, 2, 3], 30, generator=torch.Generator().manual_seed(5)))

    plain, skipping, counts = both(model, monkeypatch, sample)
    assert plain == skipping
    assert min(counts["skipped"][1:]) > 0.1


def test_where_skipping_is_not_used(monkeypatch):
    model = sparse_lm(False, "sample")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setenv("HMLM_SKIP_COPY", "1")
    plan = model.rnn.fast_plan(cpu, torch.float32)
    assert copy_skip.skips(plan, cpu)
    assert not copy_skip.skips(plan, cuda)  # a host read of z per layer step would stall the GPU
    assert not copy_skip.skips(plan, cpu, torch.bfloat16)  # numpy has no bfloat16
    model.train()  # random draws in training: skipping would leave out the draws of the rows that copy
    assert not copy_skip.skips(model.rnn.fast_plan(cpu, torch.float32), cpu)
    with torch.no_grad():
        with copy_skip.skipping(plan, cpu, 1, torch.float32) as step:  # one stream: a layer that copies is skipped
            assert isinstance(step, copy_skip.SkippingStep)
        with copy_skip.skipping(plan, cpu, 64, torch.float32) as step:  # small layer steps: gathering would not pay
            assert step is None
        big = fast.Plan((512, 512, 512), (0, 512, 512), True, "step", False, 1.0, torch.float32)
        with copy_skip.skipping(big, cpu, 64, torch.float32) as step:  # the paper's PTB shape, batch 64: it pays
            assert isinstance(step, copy_skip.SkippingStep)
    with copy_skip.skipping(big, cpu, 64, torch.float32) as step:  # with gradients: never
        assert step is None
    assert copy_skip.gather_fraction(64, *copy_skip.step_sizes(big, 1)) >= 0.8
    monkeypatch.setenv("HMLM_SKIP_COPY", "0")
    assert not copy_skip.skips(plan, cpu)
    assert stepper_for(model.eval(), model.initial_state(1)) is None
    with torch.no_grad(), copy_skip.skipping(plan, cpu, 1, torch.float32) as step:
        assert step is None


def test_gradients_are_the_same_with_skipping_on(monkeypatch):
    """With gradients on, nothing is skipped: training is untouched."""
    model = sparse_lm(True, "step", F64)
    tokens = torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(6))

    def grads():
        model.zero_grad()
        model(tokens).logits.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain, skipping, counts = both(model, monkeypatch, grads)
    assert all(torch.equal(a, b) for a, b in zip(plain, skipping, strict=True))
    assert counts == {"copy": [], "skipped": []}  # nothing counted: no skipping ran


# ---- a trained model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny HM-LSTM trained for 30 steps on the synthetic corpus, and its validation tokens."""
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    config = small_config(data, batch_size=8, max_steps=30, eval_every=30, log_every=10, sample_length=0)
    from hmlm.checkpoint import load_model

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(config, run_dir, progress=False)
    model, vocab = load_model(run_dir)
    tokens = np.fromfile(data / "synthetic" / "valid.bin", dtype=np.uint8)[:6000]
    return model, vocab, tokens


@pytest.mark.parametrize("engine", ["mkl", "onednn"])
def test_a_trained_model_evaluates_and_samples_the_same(trained, engine, monkeypatch):
    model, vocab, tokens = trained
    monkeypatch.setattr(copy_skip, "GATHER_FRACTION", 1.0)
    use_engine(engine, monkeypatch)
    plain, skipping, counts = both(model, monkeypatch, lambda: evaluate(model, tokens, batch_size=16, seq_len=50))
    assert skipping.bpc == plain.bpc and skipping.boundary_rate == plain.boundary_rate
    assert max(counts["skipped"][1:]) > 0

    def sample() -> list[int]:
        return list(generate_ids(model, vocab.encode("ka "), 300, generator=torch.Generator().manual_seed(7)))

    plain, skipping, counts = both(model, monkeypatch, sample)
    assert plain == skipping
    assert max(counts["skipped"][1:]) > 0
