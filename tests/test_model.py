"""The HM-LSTM stack and the character LM: the table of docs/design.md ("The model") on inputs nobody chose,
the fast path against the reference (float64, forward and gradients), chunking, the slope, the boundary modes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close64, use_kernels

from hmlm import HMLSTM, CharLM, HMLSTMState, ModelConfig
from hmlm.cell import CELLS, reference_step
from hmlm.fast import kernels

F64 = torch.float64


IMPLS = ["fast", "reference"]


@pytest.fixture(autouse=True, params=["fused", "torch-ops"])
def fast_kernels(request, monkeypatch):
    """Every test here runs twice: the fast path with the C++ CPU kernels of hmlm/fast/kernels/cpu.py, and with torch
    ops only (where no fused backend can serve, or the kernels cannot be built). The Triton kernels run the same
    comparisons in tests/test_kernels_triton.py."""
    use_kernels(monkeypatch, "cpu" if request.param == "fused" else "torch")
    return request.param


class KernelSpy:
    """Stands in for the compiled module: notes which kernels are called, and passes the calls on."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, set()

    def __getattr__(self, name: str):
        self.calls.add(name)
        return getattr(self.kernels, name)


def test_the_fast_path_uses_the_fused_kernels_where_it_can(fast_kernels: str, monkeypatch):
    """Every backend, the torch ops too, runs through kernels.load and the same three functions."""
    load, spies = kernels.load, {}

    def spying_load(backend: str):
        return spies.setdefault(backend, KernelSpy(load(backend)))

    monkeypatch.setattr(kernels, "load", spying_load)
    rnn = make_rnn([6, 5, 4], layer_norm=True)
    rnn(torch.randn(2, 3, 6, dtype=F64)).hidden[-1].sum().backward()
    assert list(spies) == (["cpu"] if fast_kernels == "fused" else ["torch"])
    assert next(iter(spies.values())).calls == {"cell_forward", "cell_backward", "route_backward"}


def make_rnn(
    sizes: list[int], layer_norm: bool = False, mode: str = "step", impl: str = "fast", input_size: int = 6, seed=0,
    cell: str = "hmlm",
) -> HMLSTM:  # fmt: skip
    """A float64 HM-LSTM whose every parameter is perturbed, so layer norm gains and biases matter too."""
    torch.manual_seed(seed)
    rnn = HMLSTM(input_size, sizes, layer_norm=layer_norm, boundary=mode, impl=impl, cell=cell).to(F64)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return rnn


def random_state(rnn: HMLSTM, batch: int, seed: int = 1) -> HMLSTMState:
    """A state from the middle of a sequence: random h and c, boundaries 0 or 1 (the top layer's always 0)."""
    gen = torch.Generator().manual_seed(seed)
    h = [torch.randn(batch, size, generator=gen, dtype=F64) for size in rnn.hidden_sizes]
    c = [torch.randn(batch, size, generator=gen, dtype=F64) for size in rnn.hidden_sizes]
    z = [torch.randint(0, 2, (batch, 1), generator=gen).to(F64) for _ in rnn.hidden_sizes]
    z[-1].zero_()
    return HMLSTMState(h, c, z)


def operations(z_prev: torch.Tensor, z_below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean (B,) masks of FLUSH, UPDATE and COPY from z^l_{t-1} and z^{l-1}_t, each (B, 1)."""
    z_prev, z_below = z_prev.squeeze(1).bool(), z_below.squeeze(1).bool()
    return z_prev, ~z_prev & z_below, ~z_prev & ~z_below


def param_grads(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor]:
    """d loss / d every parameter, zeros for a parameter that the loss does not reach."""
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


# --- The table, on random inputs ---------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_every_step_follows_the_table(impl: str, layer_norm: bool):
    """Step the model one character at a time and check what each layer did against the table:
    COPY leaves h and c exactly unchanged and opens no boundary, FLUSH ignores the old c, UPDATE reads it;
    layer 1 never copies (z^0 = 1), the top layer never flushes and moves only when the layer below fires."""
    B, T = 16, 25
    rnn = make_rnn([6, 5, 4], layer_norm, impl=impl)
    x = torch.randn(B, T, rnn.input_size, dtype=F64)
    state = rnn.initial_state(B)
    counts = torch.zeros(rnn.num_layers, 3, dtype=torch.long)  # per layer: FLUSH, UPDATE, COPY row-steps
    for t in range(T):
        x_t = x[:, t : t + 1]
        new = rnn(x_t, state).state
        for layer in range(rnn.num_layers):
            z_below = torch.ones(B, 1, dtype=F64) if layer == 0 else new.z[layer - 1]
            flush, update, copy = operations(state.z[layer], z_below)
            counts[layer] += torch.stack([flush.sum(), update.sum(), copy.sum()])
            h_prev, c_prev = state.h[layer], state.c[layer]
            h, c, z = new.h[layer], new.c[layer], new.z[layer]
            assert torch.equal(h[copy], h_prev[copy]) and torch.equal(c[copy], c_prev[copy])
            assert torch.equal(z[copy], torch.zeros_like(z[copy]))
            assert not (h == h_prev).all(-1)[~copy].any(), "a computed step left h unchanged"
            # Perturb this layer's old memory alone: FLUSH rows must not see it, UPDATE rows must.
            c_other = [ci.clone() for ci in state.c]
            c_other[layer] += 1.0
            other = rnn(x_t, HMLSTMState(state.h, c_other, state.z)).state
            assert torch.equal(other.c[layer][flush], c[flush]) and torch.equal(other.h[layer][flush], h[flush])
            assert not (other.c[layer] == c).all(-1)[update].any()
        assert torch.equal(new.z[-1], torch.zeros(B, 1, dtype=F64))  # the top layer has no boundary
        state = new
    flushes, updates, copies = counts.T
    assert copies[0] == 0, "layer 1 sees z^0 = 1 and never copies"
    assert flushes[-1] == 0, "the top layer never flushes"
    assert (updates > 0).all() and (copies[1:] > 0).all() and (flushes[:-1] > 0).all(), counts


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_full_sequence_outputs_follow_the_table(impl: str):
    """The same rules read off one long call: hidden[l][:, t] == hidden[l][:, t-1] exactly at COPY steps,
    no boundary opens on them, and the top layer copies whenever z^{L-1}_t = 0."""
    B, T = 16, 40
    rnn = make_rnn([6, 5, 4], layer_norm=True, impl=impl)
    state = random_state(rnn, B)
    out = rnn(torch.randn(B, T, rnn.input_size, dtype=F64), state)
    L = rnn.num_layers
    z_all = torch.cat(
        [torch.cat(state.z, 1).unsqueeze(1), torch.cat([out.boundaries, torch.zeros(B, T, 1, dtype=F64)], 2)], 1
    )
    h_all = [torch.cat([h0.unsqueeze(1), h], 1) for h0, h in zip(state.h, out.hidden, strict=True)]  # (B, T+1, H)
    assert set(out.boundaries.unique().tolist()) == {0.0, 1.0}
    for layer in range(L):
        for t in range(1, T + 1):
            z_below = torch.ones(B, 1, dtype=F64) if layer == 0 else z_all[:, t, layer - 1 : layer]
            _, _, copy = operations(z_all[:, t - 1, layer : layer + 1], z_below)
            assert torch.equal(h_all[layer][copy, t], h_all[layer][copy, t - 1])
            assert not (h_all[layer][~copy, t] == h_all[layer][~copy, t - 1]).all(-1).any()
            assert (z_all[copy, t, layer] == 0).all()
    top_moves = z_all[:, 1:, L - 2].bool()  # (B, T)
    top_same = (h_all[-1][:, 1:] == h_all[-1][:, :-1]).all(-1)  # (B, T)
    assert torch.equal(top_same, ~top_moves)


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_model_is_the_reference_step_wired_as_the_paper_says(impl: str):
    """Replay the model by hand with cell.reference_step: layer 1 sees x_t with z^0 = 1, layer l sees
    h^{l-1}_t and z^{l-1}_t from this step and h^{l+1}_{t-1} from the last one."""
    B, T = 5, 12
    rnn = make_rnn([6, 5, 4], layer_norm=True, impl=impl)
    x = torch.randn(B, T, rnn.input_size, dtype=F64)
    state = random_state(rnn, B)
    out = rnn(x, state)
    h, c, z = list(state.h), list(state.c), list(state.z)
    weights = [rnn.layer_weights(layer) for layer in range(rnn.num_layers)]
    for t in range(T):
        h_below, z_below = x[:, t], torch.ones(B, 1, dtype=F64)
        h_above = h[1:] + [None]
        for layer in range(rnn.num_layers):
            h[layer], c[layer], z[layer] = reference_step(
                weights[layer], h_below, z_below, h[layer], c[layer], z[layer], h_above[layer], 1.0
            )
            h_below, z_below = h[layer], z[layer]
            assert_close64(out.hidden[layer][:, t], h[layer])
        assert_close64(out.boundaries[:, t], torch.cat(z[:-1], 1))
    for mine, theirs in zip(out.state, (h, c, z), strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert_close64(a, b)


# --- Chunking, the slope -----------------------------------------------------------------------------------


def loss_of(out, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """A scalar that depends on every output of an HMLSTM call through fixed random weights."""
    loss = sum((h * weights[f"hidden{i}"]).sum() for i, h in enumerate(out.hidden))
    loss = loss + (out.boundaries * weights["boundaries"]).sum()
    for part in ("h", "c", "z"):
        loss = loss + sum((s * weights[f"{part}{i}"]).sum() for i, s in enumerate(getattr(out.state, part)))
    return loss


def loss_weights(out, seed: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def like(t: torch.Tensor) -> torch.Tensor:  # drawn on the CPU, so the same on every device
        return torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device)

    weights = {f"hidden{i}": like(h) for i, h in enumerate(out.hidden)}
    weights["boundaries"] = like(out.boundaries)
    for part in ("h", "c", "z"):
        for i, s in enumerate(getattr(out.state, part)):
            weights[f"{part}{i}"] = like(s)
    return weights


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_chunked_run_with_carried_state_equals_one_long_run(impl: str, layer_norm: bool):
    B, T = 4, 20
    rnn = make_rnn([6, 5, 4], layer_norm, impl=impl)
    x = torch.randn(B, T, rnn.input_size, dtype=F64)
    state = random_state(rnn, B)

    long = rnn(x, state)
    hidden_w = [torch.randn_like(h) for h in long.hidden]
    long_loss = sum((h * w).sum() for h, w in zip(long.hidden, hidden_w, strict=True))
    long_grads = param_grads(long_loss, rnn)

    chunk_state, hidden, boundaries = state, [[] for _ in rnn.hidden_sizes], []
    for start, stop in [(0, 7), (7, 8), (8, 14), (14, 20)]:  # uneven chunks, one of a single step
        out = rnn(x[:, start:stop], chunk_state)
        chunk_state = out.state  # carried, not detached: the gradient flows across chunks
        for layer, h in enumerate(out.hidden):
            hidden[layer].append(h)
        boundaries.append(out.boundaries)
    hidden = [torch.cat(hs, 1) for hs in hidden]
    chunk_loss = sum((h * w).sum() for h, w in zip(hidden, hidden_w, strict=True))
    chunk_grads = param_grads(chunk_loss, rnn)

    for mine, theirs in zip(hidden, long.hidden, strict=True):
        assert_close64(mine, theirs)
    assert torch.equal(torch.cat(boundaries, 1), long.boundaries)
    for mine, theirs in zip(chunk_state, long.state, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert_close64(a, b)
    for mine, theirs in zip(chunk_grads, long_grads, strict=True):
        assert_close64(mine, theirs)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_does_not_depend_on_the_slope_but_the_gradients_do(impl: str):
    B, T = 6, 15
    rnn = make_rnn([6, 5, 4], layer_norm=True, impl=impl)
    x = torch.randn(B, T, rnn.input_size, dtype=F64)
    outs, grads = [], []
    for slope in (1.0, 5.0):
        out = rnn(x, slope=slope)
        outs.append(out)
        # A loss through the hidden states only: the boundaries reach it through the choice of operation.
        loss = sum((h * torch.linspace(-1, 1, h.shape[-1], dtype=F64)).sum() for h in out.hidden)
        names = [n for n, _ in rnn.named_parameters()]
        grads.append(dict(zip(names, param_grads(loss, rnn), strict=True)))
    a, b = outs
    assert all(torch.equal(h1, h5) for h1, h5 in zip(a.hidden, b.hidden, strict=True))
    assert torch.equal(a.boundaries, b.boundaries)
    assert all(
        torch.equal(s1, s5) for p1, p5 in zip(a.state, b.state, strict=True) for s1, s5 in zip(p1, p5, strict=True)
    )
    # The boundary detector's gradient changes with the slope (here: for every layer that has one).
    for layer in range(rnn.num_layers - 1):
        rows = 4 * rnn.hidden_sizes[layer] + 1  # the last row computes zhat
        detector = [
            torch.cat([g[n][-1].reshape(-1) for n in g if n.endswith(f".{layer}") and g[n].shape[0] == rows])
            for g in grads
        ]
        assert not torch.allclose(detector[0], detector[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_charlm_forward_does_not_depend_on_the_slope(impl: str):
    torch.manual_seed(0)
    model = CharLM(11, ModelConfig(embed_dim=5, hidden_sizes=[6, 5, 4], output_embed_dim=7)).double()
    model.rnn.impl = impl
    tokens = torch.randint(0, 11, (3, 17))
    a, b = model(tokens, slope=1.0), model(tokens, slope=5.0)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boundaries, b.boundaries)
    ga = torch.autograd.grad(a.logits.logsumexp(-1).sum(), model.embedding.weight)[0]
    gb = torch.autograd.grad(b.logits.logsumexp(-1).sum(), model.embedding.weight)[0]
    assert not torch.allclose(ga, gb)


# --- The fast path is the reference, in float64 ------------------------------------------------------------


# SLOPE has no float32 value (2.1 is 2.0999999046 in float32): a path that rounded the slope to float32 would move
# the soft boundaries and the straight-through gradients and fail the float64 comparisons below (assert_close64;
# test_the_comparison_sees_a_slope_rounded_to_float32), where with a slope exact in float32 (2.0) it would pass
# whatever the tolerance.
SLOPE = 2.1


def run_one(rnn: HMLSTM, impl: str, x: torch.Tensor, state: HMLSTMState, seed: int | None, slope):
    """The outputs of one implementation, and the gradients of loss_of them (parameters, input, initial state)."""
    rnn.impl = impl
    x_ = x.clone().requires_grad_()
    state_ = HMLSTMState(*([t.clone().requires_grad_() for t in part] for part in state))
    if seed is not None:
        torch.manual_seed(seed)  # sample mode: both implementations draw the same Bernoulli numbers
    out = rnn(x_, state_, slope=slope)
    loss = loss_of(out, loss_weights(out))
    leaves = list(rnn.parameters()) + [x_] + [t for part in state_ for t in part]
    return out, torch.autograd.grad(loss, leaves, allow_unused=True)


def run_both(
    rnn: HMLSTM, x: torch.Tensor, state: HMLSTMState, seed: int | None = None, slope: float | torch.Tensor = SLOPE
):
    """Outputs and gradients (parameters, input, initial state) of both implementations on the same module. The
    fast path gets `slope` as given (a number, or a 0-dim tensor as the CUDA graph step passes it), the reference
    the same value as a number."""
    return {impl: run_one(rnn, impl, x, state, seed, slope if impl == "fast" else float(slope)) for impl in IMPLS}


def assert_same(results, names: list[str], **tolerance: float) -> None:
    """assert_close on every output and gradient: equal in float64 (assert_close64), or to the rtol and atol given."""

    def close(mine: torch.Tensor, theirs: torch.Tensor, msg=None) -> None:
        if tolerance:
            torch.testing.assert_close(mine, theirs, msg=msg, **tolerance)
        else:
            assert_close64(mine, theirs, msg=msg)

    (out_f, grads_f), (out_r, grads_r) = results["fast"], results["reference"]
    for mine, theirs in zip(out_f.hidden, out_r.hidden, strict=True):
        close(mine, theirs)
    close(out_f.boundaries, out_r.boundaries)
    for part_f, part_r in zip(out_f.state, out_r.state, strict=True):
        for mine, theirs in zip(part_f, part_r, strict=True):
            close(mine, theirs)
    for name, mine, theirs in zip(names, grads_f, grads_r, strict=True):
        if theirs is None:  # e.g. the top layer's initial z, which nothing reads
            assert mine is None or not mine.any(), name
            continue
        assert mine is not None, name
        close(mine, theirs, msg=lambda m, name=name: f"gradient of {name}: {m}")


SIZES = [[5], [7, 5], [7, 5, 3], [4, 4, 4]]


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
@pytest.mark.parametrize("mode", ["step", "soft", "sample-eval", "sample-train"])
@pytest.mark.parametrize("cell", CELLS)
def test_fast_path_equals_reference(sizes: list[int], layer_norm: bool, mode: str, cell: str):
    compare_with_reference(sizes, layer_norm, mode, B=5, T=13, cell=cell)


def compare_with_reference(
    sizes: list[int], layer_norm: bool, mode: str, B: int, T: int, device=None, cell: str = "hmlm"
):
    """The fast path against the reference from a random state, in float64 on `device` (default: the CPU).
    mode: step, soft, sample-eval or sample-train. Returns run_both's results."""
    boundary_mode, _, phase = mode.partition("-")
    rnn = make_rnn(sizes, layer_norm, boundary_mode, cell=cell)
    rnn.train(phase != "eval")
    x = torch.randn(B, T, rnn.input_size, dtype=F64)
    state = random_state(rnn, B)
    if boundary_mode == "soft":  # soft boundaries carry fractions from step to step
        state = HMLSTMState(state.h, state.c, [z * 0.6 for z in state.z])
    names = names_of(rnn)
    if device is not None:
        rnn, x = rnn.to(device), x.to(device)
        state = HMLSTMState(*([t.to(device) for t in part] for part in state))
    results = run_both(rnn, x, state, seed=123 if phase == "train" else None)
    assert_same(results, names)
    if boundary_mode == "soft" and len(sizes) > 1:
        b = results["fast"][0].boundaries
        assert ((b > 0) & (b < 1)).any(), "soft boundaries should take fractional values"
    return results


def names_of(rnn: HMLSTM) -> list[str]:
    """What run_one differentiates, in its order: the parameters, the input, the initial state."""
    layers = range(rnn.num_layers)
    return [n for n, _ in rnn.named_parameters()] + ["x"] + [f"state.{p}{i}" for p in "hcz" for i in layers]


@pytest.mark.parametrize("mode", ["step", "soft"])
def test_the_comparison_sees_a_slope_rounded_to_float32(mode: str):
    """The reference against itself with the slope rounded to float32: assert_same tells them apart (the soft
    boundaries and the straight-through gradients move), so the comparisons above prove the slope unrounded."""
    rounded = float(torch.tensor(SLOPE, dtype=torch.float32))
    assert rounded != SLOPE
    rnn = make_rnn([7, 5, 3], layer_norm=True, mode=mode)
    x = torch.randn(3, 5, rnn.input_size, dtype=F64)
    state = random_state(rnn, 3)
    exact = run_one(rnn, "reference", x, state, None, SLOPE)
    assert_same({"fast": exact, "reference": run_one(rnn, "reference", x, state, None, SLOPE)}, names_of(rnn))
    with pytest.raises(AssertionError):
        assert_same({"fast": exact, "reference": run_one(rnn, "reference", x, state, None, rounded)}, names_of(rnn))


def test_fast_path_equals_reference_on_two_threads():
    """The fused kernels hand rows to torch's threads in chunks (at least 64 rows at H = 64) and sum the chunks'
    layer norm gradients under a lock; the rest of the suite runs on one thread, so here two threads get a
    chunk of 65 rows each."""
    rnn = make_rnn([64, 64], layer_norm=True, input_size=8)
    x = torch.randn(130, 6, 8, dtype=F64)
    state = random_state(rnn, 130)
    names = names_of(rnn)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = run_both(rnn, x, state)
    finally:
        torch.set_num_threads(threads)
    assert_same(results, names)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_charlm_fast_path_equals_reference(layer_norm: bool):
    compare_charlm_with_reference(layer_norm, B=4, T=11)


def compare_charlm_with_reference(layer_norm: bool, B: int, T: int, device=None) -> None:
    """CharLM's logits, gates, boundaries and parameter gradients, fast path against reference, in float64."""
    torch.manual_seed(0)
    config = ModelConfig(embed_dim=6, hidden_sizes=[7, 5, 3], output_embed_dim=8, layer_norm=layer_norm)
    model = CharLM(13, config).double().to(device)
    tokens = torch.randint(0, 13, (B, T)).to(device)
    targets = torch.randint(0, 13, (B, T)).to(device)
    results = {}
    for impl in IMPLS:
        model.rnn.impl = impl
        out = model(tokens, slope=SLOPE)
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten())
        results[impl] = (out, param_grads(loss, model))
    (out_f, grads_f), (out_r, grads_r) = results["fast"], results["reference"]
    assert_close64(out_f.logits, out_r.logits)
    assert_close64(out_f.gates, out_r.gates)
    assert torch.equal(out_f.boundaries, out_r.boundaries)
    for (name, _), mine, theirs in zip(model.named_parameters(), grads_f, grads_r, strict=True):
        assert_close64(mine, theirs, msg=lambda m, name=name: f"gradient of {name}: {m}")


# --- Boundary modes, layer norm, evaluation ----------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_boundary_modes(impl: str):
    B, T = 8, 30
    x = torch.randn(B, T, 6, dtype=F64)
    step = make_rnn([6, 5, 4], mode="step", impl=impl)(x).boundaries
    assert set(step.unique().tolist()) == {0.0, 1.0}

    soft = make_rnn([6, 5, 4], mode="soft", impl=impl)(x).boundaries
    assert soft.min() >= 0 and soft.max() <= 1 and ((soft > 0) & (soft < 1)).any()

    sample = make_rnn([6, 5, 4], mode="sample", impl=impl)
    sample.train()
    torch.manual_seed(1)
    drawn = sample(x).boundaries
    assert set(drawn.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(drawn, step), "in training, sample draws its boundaries"
    sample.eval()
    assert torch.equal(sample(x).boundaries, step), "in evaluation, sample is step"


@torch.no_grad()
def test_layer_norm_is_used_and_has_its_own_parameters():
    x = torch.randn(3, 9, 6, dtype=F64)
    plain = make_rnn([6, 5, 4], layer_norm=False, seed=0)
    normed = make_rnn([6, 5, 4], layer_norm=True, seed=0)
    extra = {n for n, _ in normed.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert len(extra) == 4 * 3  # gate gain and bias, cell gain and bias, per layer
    assert not torch.allclose(plain(x).hidden[0], normed(x).hidden[0])
    # Each gate block is normalized on its own: scaling every weight into one block (the forget gate of
    # layer 1) changes nothing with layer norm, and changes the output without it.
    for rnn, invariant in ((normed, True), (plain, False)):
        before = rnn(x).hidden[0]
        hidden = rnn.hidden_sizes[0]
        for name, p in rnn.named_parameters():
            if name.endswith(".0") and p.shape[0] == 4 * hidden + 1:
                p[:hidden] *= 3.0
        after = rnn(x).hidden[0]
        assert torch.allclose(before, after, atol=1e-5) == invariant


@pytest.mark.parametrize("impl", IMPLS)
def test_evaluation_keeps_no_graph(impl: str):
    rnn = make_rnn([6, 5, 4], layer_norm=True, impl=impl)
    x = torch.randn(2, 5, 6, dtype=F64, requires_grad=True)
    with torch.no_grad():
        out = rnn(x)
    assert all(t.grad_fn is None and not t.requires_grad for t in [*out.hidden, out.boundaries, *out.state.h])
    with torch.inference_mode():
        out2 = rnn(x)
    assert_close64(out.hidden[-1], out2.hidden[-1])


def test_state_detach_cuts_the_graph_and_keeps_the_values():
    rnn = make_rnn([6, 5, 4])
    out = rnn(torch.randn(2, 5, 6, dtype=F64))
    detached = out.state.detach()
    assert isinstance(detached, HMLSTMState)
    for part, part_d in zip(out.state, detached, strict=True):
        for t, t_d in zip(part, part_d, strict=True):
            assert torch.equal(t, t_d) and t_d.grad_fn is None


@pytest.mark.parametrize("impl", IMPLS)
def test_no_state_is_the_zero_state(impl: str):
    rnn = make_rnn([6, 5, 4], impl=impl)
    x = torch.randn(3, 6, 6, dtype=F64)
    a, b = rnn(x), rnn(x, rnn.initial_state(3))
    assert torch.equal(a.hidden[-1], b.hidden[-1]) and torch.equal(a.boundaries, b.boundaries)
    assert [t.shape for t in a.state.z] == [(3, 1)] * 3


def test_charlm_shapes_and_lstm_baseline():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (3, 8))
    hm = CharLM(11, ModelConfig(embed_dim=5, hidden_sizes=[6, 5, 4], output_embed_dim=7))
    out = hm(tokens)
    assert out.logits.shape == (3, 8, 11) and out.boundaries.shape == (3, 8, 2) and out.gates.shape == (3, 8, 3)
    lstm = CharLM(11, ModelConfig(kind="lstm", embed_dim=5, hidden_sizes=[6, 6], output_embed_dim=7))
    out = lstm(tokens)
    assert out.logits.shape == (3, 8, 11) and out.boundaries.shape == (3, 8, 0)
    # The baseline carries its state across calls too.
    first = lstm(tokens[:, :5])
    second = lstm(tokens[:, 5:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), out.logits)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    model = CharLM(11, ModelConfig(embed_dim=8, hidden_sizes=[16, 16, 16], output_embed_dim=16))
    tokens = torch.randint(0, 11, (4, 12))
    reference = model(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens)
        loss = out.logits.float().logsumexp(-1).mean()
    loss.backward()
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in model.parameters()
    )
    assert all(t.dtype == torch.float32 for part in out.state for t in part), "the carried state stays fp32"
    torch.testing.assert_close(out.logits.float(), reference.logits, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("grad", [False, True])
def test_outputs_of_one_call_are_not_changed_by_the_next(grad: bool):
    """The fast path reuses its scratch buffers between calls; what it returned must stay as it was."""
    rnn = make_rnn([6, 5, 4], layer_norm=True)
    x1, x2 = torch.randn(3, 7, 6, dtype=F64), torch.randn(3, 7, 6, dtype=F64)
    with torch.set_grad_enabled(grad):
        first = rnn(x1)
        kept = [t.detach().clone() for t in (*first.hidden, first.boundaries, *first.state.h, *first.state.c)]
        rnn(x2)
        rnn(x2[:, :1])
    now = [t.detach() for t in (*first.hidden, first.boundaries, *first.state.h, *first.state.c)]
    assert all(torch.equal(a, b) for a, b in zip(kept, now, strict=True))


@torch.no_grad()
def test_stepping_one_symbol_at_a_time_equals_one_call():
    """What sampling does: T = 1 calls with the state carried (no gradient), against one call over the sequence."""
    rnn = make_rnn([6, 5, 4], layer_norm=True)
    x = torch.randn(2, 9, 6, dtype=F64)
    whole = rnn(x)
    state, hidden = None, []
    for t in range(9):
        out = rnn(x[:, t : t + 1], state)
        state = out.state
        hidden.append(out.hidden[-1])
    assert_close64(torch.cat(hidden, 1), whole.hidden[-1])
    for mine, theirs in zip(state, whole.state, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert_close64(a, b)


def test_a_second_backward_through_the_fast_path_fails_clearly():
    rnn = make_rnn([6, 5, 4])
    loss = rnn(torch.randn(2, 4, 6, dtype=F64)).hidden[-1].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
