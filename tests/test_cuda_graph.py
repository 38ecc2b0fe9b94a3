"""The captured training step (hmlm/training/cuda_graph.py): what runs without CUDA is tested here on the CPU (the slope
as a tensor, the static-buffer step run eagerly against the plain step, the verify-and-fall-back decision, the config
key, the Trainer's wiring); the graph itself is tested by the `cuda` tests, which `make gpu-check` runs on a GPU."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import require_cpu_kernels, run_hmlm, small_config, write_config
from test_model import loss_of, loss_weights, make_rnn, random_state

from hmlm import CharLM, ModelConfig
from hmlm.analysis.evaluate import evaluate
from hmlm.config import from_dict, load_config
from hmlm.data import StreamBatcher, prepare_dataset
from hmlm.errors import UserError
from hmlm.fast import kernels as backends
from hmlm.training.cuda_graph import (
    CudaGraphReplay,
    EagerReplay,
    GraphTrainStep,
    StaticStep,
    mismatch,
    resolve_mode,
    set_capturable,
)
from hmlm.training.distributed import Process
from hmlm.training.trainer import Trainer, train
from hmlm.training.window import StepResult

F64 = torch.float64
CPU = torch.device("cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check runs it)")


@pytest.fixture(params=["cpu", "torch", "triton"])
def kernels(request, monkeypatch):
    """The fused C++ kernels take the slope as a number (model.py reads the tensor for them), the torch ops as a
    tensor, the Triton kernels (interpreted on the CPU) through its pointer, in the compute dtype: each is checked."""
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", request.param)
    if request.param == "cpu":
        require_cpu_kernels()
    if request.param == "triton":
        module, why = backends.load_triton(F64)
        if module is None:
            pytest.skip(f"the Triton kernels cannot run here: {why}")
        if module.DEVICE != "cpu":
            pytest.skip("the Triton kernels are compiled for CUDA in this process; this test's tensors are on the CPU")
    assert backends.select(CPU, F64) == request.param
    return request.param


# --- The slope as a 0-dim tensor ---------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("mode", ["step", "soft", "sample"])
def test_a_tensor_slope_gives_what_the_same_number_gives(kernels, impl: str, mode: str):
    B, T = 3, 9
    rnn = make_rnn([6, 5, 4], layer_norm=True, mode=mode, impl=impl)
    x = torch.randn(B, T, rnn.input_size, dtype=F64)
    results = []
    for slope in (2.5, torch.tensor(2.5, dtype=F64)):
        state = clone_state(random_state(rnn, B))
        torch.manual_seed(3)  # sample mode: the same Bernoulli draws
        out = rnn(x, state, slope=slope)
        loss = loss_of(out, loss_weights(out))
        grads = torch.autograd.grad(loss, [*rnn.parameters(), *(t for part in state for t in part)], allow_unused=True)
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    for mine, theirs in zip([*a.hidden, a.boundaries, *a.state.h], [*b.hidden, b.boundaries, *b.state.h], strict=True):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(grads_a, grads_b, strict=True):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-14, atol=1e-14)


def clone_state(state):
    """The same values as new leaves that want gradients."""
    return type(state)(*([t.clone().requires_grad_() for t in part] for part in state))


# --- The step on static buffers, run eagerly, against the plain step --------------------------------------------


def tiny_model(boundary: str = "soft", seed: int = 0) -> CharLM:
    torch.manual_seed(seed)
    return CharLM(11, ModelConfig(embed_dim=5, hidden_sizes=[6, 5, 4], output_embed_dim=7, boundary=boundary)).double()


def plain_step(model, optimizer, x, y, slope, state, grad_clip=1.0):
    """The Trainer's eager step, written out: the yardstick."""
    out = model(x, state, slope)
    loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), norm, out.state.detach()


def batches(shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    for B, T in shapes:
        yield torch.randint(0, 11, (B, T), generator=gen), torch.randint(0, 11, (B, T), generator=gen)


def test_static_step_run_eagerly_equals_the_plain_step(kernels):
    """Carried state, a slope that changes, a shorter batch (declined: the caller steps eagerly) and a learning rate
    that changes (a new capture) on the way."""
    plain, mine = tiny_model(), tiny_model()
    opt_plain = torch.optim.Adam(plain.parameters(), lr=0.01)
    opt_mine = torch.optim.Adam(mine.parameters(), lr=0.01)
    captures = []

    def factory(static):
        captures.append(static)
        return EagerReplay(static)

    graph = GraphTrainStep(mine, opt_mine, 1.0, None, CPU, "auto", pytest.fail, factory, batch_shape=(3, 8))
    state_plain = state_mine = None
    shapes = [(3, 5), (3, 8), (3, 8), (3, 5), (3, 8), (3, 8), (3, 8)]  # as a run resumed at the short batch
    for k, (x, y) in enumerate(batches(shapes)):
        slope = 1.0 + 0.5 * k
        if k == 5:
            for opt in (opt_plain, opt_mine):
                opt.param_groups[0]["lr"] = 0.002
        loss_p, norm_p, state_plain = plain_step(plain, opt_plain, x, y, slope, state_plain)
        result, state_mine = graph.step(x, y, slope, state_mine)
        if x.shape[1] == 5:
            assert result is None  # the shorter batch: eager, from the carried state
            _, _, state_mine = plain_step(mine, opt_mine, x, y, slope, state_mine)
            continue
        assert result is not None
        torch.testing.assert_close(result.loss, loss_p, rtol=0, atol=1e-14)
        torch.testing.assert_close(result.grad_norm, norm_p, rtol=0, atol=1e-14)
        assert bool(result.finite)
    for a, b in zip(plain.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    for a, b in zip(state_plain, state_mine, strict=True):
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(ta, tb, rtol=1e-13, atol=1e-13)
    assert len(captures) == 2  # the first step, and the new learning rate


def test_the_step_leaves_a_nonfinite_flag_on_the_device():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    static = StaticStep(model, optimizer, 1.0, None, (3, 8), CPU)
    x, y = next(batches([(3, 8)]))
    static.load_step(x, y, 1.0, None)
    with torch.no_grad():
        model.output.logits.bias[0] = float("nan")
    assert not bool(static.eager().finite)


# --- Verify, and fall back -------------------------------------------------------------------------------------


def test_a_mismatch_on_the_first_replay_gives_one_warning_and_eager_steps_after():
    model, reference = tiny_model(), tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    warnings, replays = [], []

    def factory(static):
        replays.append(static)
        return EagerReplay(static, perturb=0.01)  # the 'replay' disagrees with the eager step by 1%

    graph = GraphTrainStep(model, optimizer, 1.0, None, CPU, "auto", warnings.append, factory)
    state = None
    for x, y in batches([(3, 8)] * 3):
        result, state = graph.step(x, y, 1.0, state)
        assert result is None
        _, _, state = plain_step(model, optimizer, x, y, 1.0, state)  # the caller's eager step
    assert len(warnings) == 1 and "differs from the eager step" in warnings[0], warnings
    assert warnings[0].startswith("warning: train.cuda_graph auto:")
    assert len(replays) == 1
    assert optimizer.param_groups[0]["capturable"] is False
    # The checked replay was undone: the three eager steps alone made the weights.
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.01)
    ref_state = None
    for x, y in batches([(3, 8)] * 3):
        _, _, ref_state = plain_step(reference, ref_opt, x, y, 1.0, ref_state)
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


class FailingCapture(EagerReplay):
    def capture(self) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_failed_capture_falls_back_under_auto_and_is_an_error_under_on():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    warnings = []
    graph = GraphTrainStep(model, optimizer, 1.0, None, CPU, "auto", warnings.append, FailingCapture)
    x, y = next(batches([(3, 8)]))
    result, state = graph.step(x, y, 1.0, None)
    assert result is None and warnings == [
        "warning: train.cuda_graph auto: capturing the training step failed: RuntimeError: operation not permitted "
        "when stream is capturing; training without CUDA graphs"
    ]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(torch.count_nonzero(t) == 0 for part in state for t in part)  # the zero state to start from

    graph = GraphTrainStep(model, optimizer, 1.0, None, CPU, "on", warnings.append, FailingCapture)
    with pytest.raises(UserError, match="train.cuda_graph is on but capturing the training step failed"):
        graph.step(x, y, 1.0, None)


class DrawingThenFailingCapture(EagerReplay):
    """A warm-up that draws random numbers (as `sample` boundaries do) and changes the weights, then a capture that
    fails."""

    def capture(self) -> None:
        self.step.eager()
        torch.rand(5)
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_a_failed_capture_leaves_the_run_as_it_was_random_generator_included(mode: str):
    model = tiny_model(boundary="sample")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    graph = GraphTrainStep(model, optimizer, 1.0, None, CPU, mode, lambda message: None, DrawingThenFailingCapture)
    x, y = next(batches([(3, 8)]))
    if mode == "on":
        with pytest.raises(UserError, match="capturing the training step failed: RuntimeError: CUDA error"):
            graph.step(x, y, 1.0, None)
    else:
        assert graph.step(x, y, 1.0, None)[0] is None
    assert torch.equal(torch.get_rng_state(), rng), "the failed warm-up's draws were not undone"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_a_mismatched_replay_leaves_the_random_generator_as_it_was():
    """Under `auto` the checked replay and the eager step it is checked against both draw; after the fallback the
    caller's eager step must draw what it would have drawn without graphs (a resumed run depends on it)."""
    model = tiny_model(boundary="sample")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(12)
    rng = torch.get_rng_state()
    graph = GraphTrainStep(model, optimizer, 1.0, None, CPU, "auto", lambda message: None,
                           lambda static: EagerReplay(static, perturb=0.01))  # fmt: skip
    x, y = next(batches([(3, 8)]))
    assert graph.step(x, y, 1.0, None)[0] is None
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_a_capture_launches_only_kernel_variants_its_warm_up_compiled(dtype: torch.dtype, monkeypatch):
    """A kernel compiled inside torch.cuda.graph would fail the capture. The captured regions (the training step and
    evaluation's forward) are run here on the CPU, once plainly (as the warm-up runs) and once with the branches a
    capture takes (devices.rehearsing_capture), and the Triton launches of both recorded (interpreted)."""
    monkeypatch.delenv("HMLM_FUSED", raising=False)
    monkeypatch.setenv("HMLM_KERNELS", "triton")
    module, why = backends.load_triton(dtype)
    if module is None or module.DEVICE != "cpu":
        pytest.skip(f"the Triton kernels are not interpreted on the CPU here: {why or module.MODE}")
    from hmlm.devices import rehearsing_capture
    from hmlm.graphs import EvalGraph

    model = tiny_model(boundary="soft").to(dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    static = StaticStep(model, optimizer, 1.0, None, (2, 4), CPU)
    evaluation = EvalGraph(model, (2, 4), CPU, None)
    variants = {}
    for phase, context in (("warm-up", contextlib.nullcontext()), ("capture", rehearsing_capture())):
        with module.recording() as launches, context:
            static.eager()
            with torch.no_grad():
                model.eval()
                evaluation._compute()
                model.train()
        variants[phase] = set(launches)
        assert launches, "the Triton kernels did not run"
    assert variants["capture"] <= variants["warm-up"]


def test_mismatch_tolerances():
    assert mismatch((2.0, 1.0), (2.0 * (1 + 1e-5), 1.0 * (1 + 1e-3)), torch.float32) is None
    assert "loss" in mismatch((2.0, 1.0), (2.01, 1.0), torch.float32)
    assert "gradient norm" in mismatch((2.0, 1.0), (2.0, 1.1), torch.float32)
    assert "loss" in mismatch((2.0, 1.0), (2.0 * (1 + 1e-6), 1.0), torch.float64)
    assert "not finite" in mismatch((float("nan"), 1.0), (2.0, 1.0), torch.float32)


# --- When to capture: the config key -----------------------------------------------------------------------------


def test_resolve_mode():
    warnings = []
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert resolve_mode("auto", CPU, False, warnings.append) is False
    assert resolve_mode("off", cuda, False, warnings.append) is False
    assert resolve_mode("auto", cuda, False, warnings.append) is True
    assert resolve_mode("on", cuda, False, warnings.append) is True
    assert warnings == []
    assert resolve_mode("auto", cuda, True, warnings.append) is False
    assert len(warnings) == 1 and "torchrun" in warnings[0]
    with pytest.raises(UserError, match="CUDA graphs need CUDA; use train.cuda_graph=auto or off"):
        resolve_mode("on", CPU, False, warnings.append)
    with pytest.raises(UserError, match="torchrun"):
        resolve_mode("on", cuda, True, warnings.append)


def load_config_text(tmp_path: Path, text: str, overrides: list[str] | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path, overrides)


def test_config_key(tmp_path):
    assert from_dict({}).train.cuda_graph == "auto"
    assert from_dict({"train": {"cuda_graph": "off"}}).train.cuda_graph == "off"
    # YAML 1.1 reads on and off as booleans, in a file as after -s
    assert load_config_text(tmp_path, "train:\n  cuda_graph: off\n").train.cuda_graph == "off"
    assert load_config_text(tmp_path, "", ["train.cuda_graph=on"]).train.cuda_graph == "on"
    with pytest.raises(UserError, match="config key train.cuda_graph must be one of auto, on, off, not 'yes'"):
        from_dict({"train": {"cuda_graph": "yes"}})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data


def test_on_without_cuda_is_one_clear_error(data_dir, tmp_path):
    config = small_config(data_dir, cuda_graph="on", device="cpu")
    with pytest.raises(UserError, match="train.cuda_graph is on but training runs on cpu"):
        Trainer(config, tmp_path / "run", Process(), CPU, progress=False)
    assert Trainer(small_config(data_dir), tmp_path / "run", Process(), CPU, progress=False).graph_step is None
    config = write_config(tmp_path / "c.yaml", data_dir, device="cpu")
    result = run_hmlm("train", "-c", str(config), "-s", "train.cuda_graph=on", "--run-dir", "r", cwd=tmp_path,
                      check=False)  # fmt: skip
    expected = "error: train.cuda_graph is on but training runs on cpu: CUDA graphs need CUDA; use "
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [expected + "train.cuda_graph=auto or off"]
    assert not (tmp_path / "r").exists()  # nothing half-written


# --- The Trainer's wiring ---------------------------------------------------------------------------------------


class BufferReplay(EagerReplay):
    """Hands back its results as a CUDA graph does: the same tensors at every replay, overwritten in place."""

    def __init__(self, step: StaticStep):
        super().__init__(step)
        self.out: StepResult | None = None

    def replay(self) -> StepResult:
        result = super().replay()
        if self.out is None:
            self.out = copy.deepcopy(result)
        for name in ("loss", "grad_norm", "finite", "boundaries"):
            getattr(self.out, name).copy_(getattr(result, name))
        return self.out


def test_trainer_with_the_static_step_trains_as_the_eager_trainer(data_dir, tmp_path, kernels):
    """Two epochs of 3 batches (10, 10 and a shorter 2) through Trainer.train_step: the captured path (replayed
    eagerly here, its results in buffers that the next replay overwrites) hands the carried state to the eager step
    of the shorter batch and back, ends where the plain Trainer ends, and its log window sums the same. A
    non-finite captured step is found at the next check (its Adam update already applied, as the eager one's)."""
    config = small_config(data_dir, precision="fp64")
    config.model.boundary = "soft"
    trainers, totals = [], []
    for graph in (False, True):
        trainer = Trainer(config, tmp_path / f"run{graph}", Process(), CPU, progress=False)
        trainer.batcher = StreamBatcher(trainer.dataset.split("train")[: 4 * 23], 4, 10)
        if graph:
            trainer.graph_step = GraphTrainStep(trainer.model, trainer.optimizer, 1.0, None, CPU, "auto",
                                                pytest.fail, BufferReplay)  # fmt: skip
        for epoch in range(2):
            for step, (x, y) in enumerate(trainer.batcher):
                result = trainer.train_step(x, y, slope=1.0 + 0.1 * step + epoch)
                assert isinstance(result, StepResult) and result.boundaries.shape == (2,)
                assert result.positions == 4 * x.shape[1] and bool(result.finite)
                trainer.window.add(result)  # before the next step overwrites a replay's buffers
        trainers.append(trainer)
        totals.append(trainer.check(stop=False, time_up=False))
    plain, mine = trainers
    assert mine.graph_step.verified and mine.graph_step.given_up is None
    for a, b in zip(plain.model.parameters(), mine.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(plain.state, mine.state, strict=True):
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(ta, tb, rtol=1e-12, atol=1e-12)
    a, b = totals
    assert (a.steps, a.positions, a.bad_steps) == (b.steps, b.positions, b.bad_steps) == (6, 4 * 44, 0)
    assert b.loss == pytest.approx(a.loss, rel=1e-12) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-12)
    assert b.boundaries == pytest.approx(a.boundaries, rel=1e-12)

    with torch.no_grad():
        mine.model.output.logits.bias[0] = float("nan")
    x, y = mine.batcher.batch(0)
    mine.window.add(mine.train_step(x, y, slope=1.0))  # the captured step: nothing read back
    with pytest.raises(UserError, match=r"became non-finite .* in steps 1-1; no checkpoint was written yet"):
        mine.check(stop=False, time_up=False)


def test_set_capturable_moves_adams_step_counts_and_a_checkpoint_resumes_on_the_cpu():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = next(batches([(3, 8)]))
    plain_step(model, optimizer, x, y, 1.0, None)
    set_capturable(optimizer, True)  # as a CUDA-graph run leaves it (on CUDA the counts would move there)
    saved = copy.deepcopy(optimizer.state_dict())
    assert saved["param_groups"][0]["capturable"] is True
    fresh = torch.optim.Adam(model.parameters(), lr=0.01)
    fresh.load_state_dict(saved)
    set_capturable(fresh, False)  # what a resume does (hmlm/training/state.py, restore)
    assert all(s["step"].device.type == "cpu" and float(s["step"]) == 1.0 for s in fresh.state.values())
    plain_step(model, fresh, x, y, 1.0, None)  # capturable Adam on the CPU would refuse to step
    assert all(float(s["step"]) == 2.0 for s in fresh.state.values())


# --- On a GPU (make gpu-check) -----------------------------------------------------------------------------------

CUDA = torch.device("cuda")


def cuda_pair(boundary: str, dtype: torch.dtype, lr: float = 0.01):
    eager, graphed = tiny_model(boundary).to(CUDA, dtype), tiny_model(boundary).to(CUDA, dtype)
    return [(model, torch.optim.Adam(model.parameters(), lr=lr)) for model in (eager, graphed)]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", ["on", "auto"])
def test_graph_replay_equals_the_eager_step_in_float64(mode: str):
    (eager, opt_e), (graphed, opt_g) = cuda_pair("soft", F64)
    warnings = []
    graph = GraphTrainStep(graphed, opt_g, 1.0, None, CUDA, mode, warnings.append, CudaGraphReplay)
    state_e = state_g = None
    for k, (x, y) in enumerate(batches([(3, 8)] * 5)):
        if k == 3:  # the plateau scheduler's division: a new capture with the new learning rate
            for opt in (opt_e, opt_g):
                opt.param_groups[0]["lr"] = 0.002
        loss_e, norm_e, state_e = plain_step(eager, opt_e, x.to(CUDA), y.to(CUDA), 1.0 + k, state_e)
        result, state_g = graph.step(x, y, 1.0 + k, state_g)
        assert result is not None, warnings
        torch.testing.assert_close(result.loss, loss_e, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.grad_norm, norm_e, rtol=1e-12, atol=1e-12)
    for a, b in zip(eager.parameters(), graphed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert warnings == [] and graph.given_up is None


@pytest.mark.cuda
@requires_cuda
def test_a_bf16_graph_step_is_finite_and_passes_its_check():
    torch.manual_seed(0)
    model = CharLM(50, ModelConfig(embed_dim=32, hidden_sizes=[64, 64, 64], output_embed_dim=64)).to(CUDA)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    warnings = []
    graph = GraphTrainStep(model, optimizer, 1.0, torch.bfloat16, CUDA, "auto", warnings.append, CudaGraphReplay)
    state = None
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randint(0, 50, (16, 32), generator=gen), torch.randint(0, 50, (16, 32), generator=gen)
        result, state = graph.step(x, y, 1.0, state)
        assert result is not None, warnings
        assert bool(result.finite) and 2.0 < float(result.loss) < 6.0
    assert warnings == []


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("boundary", ["soft", "step"])
def test_captured_evaluation_equals_eager_evaluation(boundary: str):
    model = tiny_model(boundary).to(CUDA)
    tokens = torch.randint(0, 11, (4 * 8 * 10 + 37,), generator=torch.Generator().manual_seed(0)).numpy()
    results = {}
    for mode in ("off", "on"):  # on: a failed capture is an error, not a silent fallback
        results[mode] = evaluate(model, tokens, batch_size=4, seq_len=10, device=CUDA, cuda_graph=mode)
    off, on = results["off"], results["on"]
    assert off.tokens == on.tokens
    assert abs(off.loss - on.loss) <= 1e-12 * abs(off.loss)
    assert off.boundary_rate == pytest.approx(on.boundary_rate, rel=1e-12, abs=1e-12)


def test_on_with_a_failed_capture_stops_with_one_error_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    """`train.cuda_graph: on` where capture fails, on a resumed run: the UserError (one line, exit 2 from the CLI)
    names the reason, and the checkpoints the run had are left byte for byte as they were."""
    run = tmp_path / "run"
    train(small_config(data_dir, max_steps=4, eval_every=2, log_every=2), run, progress=False)
    before = {path.name: path.read_bytes() for path in (run / "checkpoints").iterdir()}
    assert set(before) == {"best.pt", "last.pt"}
    original_init = Trainer.__init__

    def init(self, *args, **kwargs):  # the captured step CUDA would get, with a capture that fails
        original_init(self, *args, **kwargs)
        self.graph_step = GraphTrainStep(self.model, self.optimizer, self.config.train.grad_clip, None, self.device,
                                         "on", pytest.fail, FailingCapture)  # fmt: skip

    monkeypatch.setattr(Trainer, "__init__", init)
    with pytest.raises(UserError, match="^train.cuda_graph is on but capturing the training step failed: Runtime"):
        train(None, run, resume=True, overrides=["train.max_steps=8"], progress=False)
    assert {path.name: path.read_bytes() for path in (run / "checkpoints").iterdir()} == before
