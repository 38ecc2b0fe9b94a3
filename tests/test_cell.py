"""The reference cell (docs/design.md, "The model"), checked one step at a time with the boundaries set by hand."""

from __future__ import annotations

import pytest
import torch

from hmlm.cell import LayerWeights, blend, boundary, hard_sigmoid, reference_step

B, D, H, HA = 6, 5, 4, 3  # batch, input below, this layer, layer above


def make_weights(layer_norm: bool, top: bool = False, seed: int = 0) -> LayerWeights:
    """Random float64 weights of one layer; the layer norm gains and biases are random too, so they matter."""
    gen = torch.Generator().manual_seed(seed)
    rows = 4 * H if top else 4 * H + 1

    def rand(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()

    ln_gates = (rand(4, H) + 1, rand(4, H)) if layer_norm else None
    ln_cell = (rand(H) + 1, rand(H)) if layer_norm else None
    u_above = None if top else rand(rows, HA)
    return LayerWeights(rand(rows, D), rand(rows, H), u_above, rand(rows), ln_gates, ln_cell)


def flatten(weights: LayerWeights) -> list[torch.Tensor]:
    pairs = [pair for pair in (weights.ln_gates, weights.ln_cell) if pair is not None]
    return [t for t in weights[:4] if t is not None] + [t for pair in pairs for t in pair]


def unflatten(flat: list[torch.Tensor], layer_norm: bool, top: bool) -> LayerWeights:
    w_below, u_rec, *rest = flat
    u_above = None if top else rest.pop(0)
    bias, *ln = rest
    pairs = (tuple(ln[:2]), tuple(ln[2:])) if layer_norm else (None, None)
    return LayerWeights(w_below, u_rec, u_above, bias, *pairs)


def make_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "h_below": torch.randn(B, D, generator=gen, dtype=torch.float64),
        "h_prev": torch.randn(B, H, generator=gen, dtype=torch.float64),
        "c_prev": torch.randn(B, H, generator=gen, dtype=torch.float64) * 3,  # large, so a leak would show
        "h_above": torch.randn(B, HA, generator=gen, dtype=torch.float64),
    }


def column(*values: float) -> torch.Tensor:
    """A (B, 1) boundary column holding `values` repeated over the batch."""
    return torch.tensor(values, dtype=torch.float64).repeat(B // len(values)).unsqueeze(1)


def gates_of(weights: LayerWeights, inputs: dict, z_prev: torch.Tensor, z_below: torch.Tensor):
    """f, i, o, g and zhat computed here from the equations, independently of blend()."""
    s = inputs["h_prev"] @ weights.u_rec.T + z_below * (inputs["h_below"] @ weights.w_below.T) + weights.bias
    if weights.u_above is not None:
        s = s + z_prev * (inputs["h_above"] @ weights.u_above.T)
    a = s[:, : 4 * H]
    if weights.ln_gates is not None:
        blocks = a.view(B, 4, H)
        mean, var = blocks.mean(-1, keepdim=True), blocks.var(-1, unbiased=False, keepdim=True)
        a = ((blocks - mean) / torch.sqrt(var + 1e-5) * weights.ln_gates[0] + weights.ln_gates[1]).view(B, 4 * H)
    f, i, o, g = a.chunk(4, dim=-1)
    return torch.sigmoid(f), torch.sigmoid(i), torch.sigmoid(o), torch.tanh(g), s[:, 4 * H :]


def step(weights, inputs, z_prev, z_below, slope=1.0, mode="step", training=False):
    h_above = None if weights.u_above is None else inputs["h_above"]
    return reference_step(
        weights, inputs["h_below"], z_below, inputs["h_prev"], inputs["c_prev"], z_prev, h_above,
        slope, mode, training,
    )  # fmt: skip


@torch.no_grad()
@pytest.mark.parametrize("z_below_value", [0.0, 1.0])
def test_flush_drops_the_old_memory(z_below_value: float):
    weights, inputs = make_weights(layer_norm=False), make_inputs()
    z_prev, z_below = column(1.0), column(z_below_value)
    h, c, _ = step(weights, inputs, z_prev, z_below)
    f, i, o, g, _ = gates_of(weights, inputs, z_prev, z_below)
    torch.testing.assert_close(c, i * g)  # c_{t-1} is gone
    torch.testing.assert_close(h, o * torch.tanh(i * g))
    # Nothing of c_{t-1} leaks in: another old memory gives bitwise the same step.
    h2, c2, _ = step(weights, {**inputs, "c_prev": inputs["c_prev"] * -7}, z_prev, z_below)
    assert torch.equal(c, c2) and torch.equal(h, h2)


@torch.no_grad()
def test_update_adds_to_the_memory():
    weights, inputs = make_weights(layer_norm=False), make_inputs()
    z_prev, z_below = column(0.0), column(1.0)
    h, c, _ = step(weights, inputs, z_prev, z_below)
    f, i, o, g, _ = gates_of(weights, inputs, z_prev, z_below)
    torch.testing.assert_close(c, f * inputs["c_prev"] + i * g)
    torch.testing.assert_close(h, o * torch.tanh(c))


@torch.no_grad()
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("top", [False, True])
def test_copy_leaves_the_state_exactly_unchanged(layer_norm: bool, top: bool):
    weights, inputs = make_weights(layer_norm, top), make_inputs()
    weights = weights._replace(bias=weights.bias + 10.0)  # zhat >> 0: a boundary would open if it could
    h, c, z = step(weights, inputs, column(0.0), column(0.0), slope=5.0)
    assert torch.equal(h, inputs["h_prev"])
    assert torch.equal(c, inputs["c_prev"])
    assert torch.equal(z, torch.zeros(B, 1, dtype=torch.float64))  # z^l_t = z^l_{t-1} = 0: no boundary on a COPY


@torch.no_grad()
@pytest.mark.parametrize("layer_norm", [False, True])
def test_boundary_opens_exactly_where_zhat_is_positive_on_computed_steps(layer_norm: bool):
    weights, inputs = make_weights(layer_norm), make_inputs()
    # Centre zhat on 0 so that both signs occur (the bias of the zhat row is the last entry).
    *_, zhat = gates_of(weights, inputs, column(1.0), column(1.0))
    bias = weights.bias.detach().clone()
    bias[-1] -= zhat.median()
    weights = weights._replace(bias=bias)
    # Rows alternate FLUSH and UPDATE; z must be 1[zhat > 0] on both.
    for z_prev, z_below in [(column(1.0, 0.0), column(1.0)), (column(0.0), column(1.0)), (column(1.0), column(0.0))]:
        _, _, z = step(weights, inputs, z_prev, z_below)
        *_, zhat = gates_of(weights, inputs, z_prev, z_below)
        assert zhat.gt(0).any() and zhat.le(0).any(), "the test needs both signs of zhat"
        assert torch.equal(z, (zhat > 0).double())


@torch.no_grad()
def test_top_layer_never_flushes_and_moves_only_when_the_layer_below_closes_a_segment():
    weights, inputs = make_weights(layer_norm=False, top=True), make_inputs()
    h_prev, c_prev, z_prev = inputs["h_prev"], inputs["c_prev"], torch.zeros(B, 1, dtype=torch.float64)
    z_below_seq = [column(1.0, 0.0), column(0.0, 0.0), column(0.0, 1.0), column(1.0, 1.0)]
    for z_below in z_below_seq:
        state = {**inputs, "h_prev": h_prev, "c_prev": c_prev}
        h, c, z = step(weights, state, z_prev, z_below)
        assert torch.equal(z, torch.zeros_like(z))  # no boundary detector: z^L = 0, so the next step never flushes
        moved = z_below.squeeze(1).bool()
        assert torch.equal(h[~moved], h_prev[~moved]) and torch.equal(c[~moved], c_prev[~moved])
        f, i, o, g, _ = gates_of(weights, state, z_prev, z_below)
        torch.testing.assert_close(c[moved], (f * c_prev + i * g)[moved])  # an UPDATE, never a FLUSH
        assert not moved.any() or not torch.equal(h[moved], h_prev[moved])
        h_prev, c_prev, z_prev = h, c, z


@torch.no_grad()
def test_masks_gate_the_top_down_and_bottom_up_inputs():
    """h^{l+1}_{t-1} enters only when z^l_{t-1} = 1; h^{l-1}_t only when z^{l-1}_t = 1."""
    weights, inputs = make_weights(layer_norm=False), make_inputs()
    other = {**inputs, "h_above": inputs["h_above"] + 1, "h_below": inputs["h_below"] + 1}
    # UPDATE: the top-down term is masked out, the bottom-up term is used.
    assert torch.equal(step(weights, inputs, column(0.0), column(1.0))[1],
                       step(weights, {**other, "h_below": inputs["h_below"]}, column(0.0), column(1.0))[1])  # fmt: skip
    assert not torch.equal(step(weights, inputs, column(0.0), column(1.0))[1],
                           step(weights, other, column(0.0), column(1.0))[1])  # fmt: skip
    # FLUSH with the layer below silent: only the top-down term (and the recurrent one) enter.
    assert torch.equal(step(weights, inputs, column(1.0), column(0.0))[1],
                       step(weights, {**other, "h_above": inputs["h_above"]}, column(1.0), column(0.0))[1])  # fmt: skip
    assert not torch.equal(step(weights, inputs, column(1.0), column(0.0))[1],
                           step(weights, other, column(1.0), column(0.0))[1])  # fmt: skip


def test_hard_sigmoid_values():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.1, 0.5, 3.0])
    torch.testing.assert_close(hard_sigmoid(x, 1.0), torch.tensor([0.0, 0.25, 0.5, 0.55, 0.75, 1.0]))
    torch.testing.assert_close(hard_sigmoid(x, 4.0), torch.tensor([0.0, 0.0, 0.5, 0.7, 1.0, 1.0]))


@pytest.mark.parametrize("mode", ["step", "sample", "soft"])
@pytest.mark.parametrize("slope", [1.0, 2.5, 5.0])
def test_straight_through_gradient_is_the_hard_sigmoid_derivative(mode: str, slope: float):
    # Points on both sides of the kinks at +-1/slope, none on a kink.
    zhat = torch.linspace(-1.5, 1.5, 31, dtype=torch.float64).add(0.013).requires_grad_()
    z = boundary(zhat, slope, mode, training=True)
    (grad,) = torch.autograd.grad(z.sum(), zhat)
    inside = (slope * zhat.detach()).abs() < 1
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(grad, torch.where(inside, slope * 0.5, 0.0).double())


def test_step_boundary_forward_ignores_the_slope():
    zhat = torch.randn(1000, dtype=torch.float64)
    expected = (zhat > 0).double()
    for slope in (0.5, 1.0, 5.0, 100.0):
        assert torch.equal(boundary(zhat, slope, "step"), expected)
        assert torch.equal(boundary(zhat, slope, "sample", training=False), expected)  # sample = step in eval


def test_sample_boundary_is_bernoulli_of_the_hard_sigmoid_in_training():
    torch.manual_seed(0)
    zhat = torch.full((20000,), 0.3, dtype=torch.float64)  # hard_sigmoid(0.3, slope 1) = 0.65
    z = boundary(zhat, 1.0, "sample", training=True)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    assert abs(z.mean().item() - 0.65) < 0.02
    assert torch.equal(boundary(zhat.neg(), 1.0, "sample", training=False), torch.zeros_like(zhat))


def test_soft_boundary_is_the_hard_sigmoid_not_binarized():
    zhat = torch.linspace(-2, 2, 41, dtype=torch.float64)
    z = boundary(zhat, 1.0, "soft")
    assert torch.equal(z, hard_sigmoid(zhat, 1.0))
    assert ((z > 0) & (z < 1)).any() and z.min() >= 0 and z.max() <= 1


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("top", [False, True])
def test_gradcheck_soft_boundaries(layer_norm: bool, top: bool):
    """Soft boundaries make every output smooth in every input, so finite differences check all the paths,
    the masks and the choice of operation included. A small slope keeps every zhat inside the linear region."""
    weights, inputs = make_weights(layer_norm, top), make_inputs()
    z_prev = torch.tensor([[0.0], [1.0], [0.3], [0.8], [0.0], [0.5]], dtype=torch.float64, requires_grad=True)
    z_below = torch.tensor([[0.0], [0.0], [0.6], [1.0], [1.0], [0.2]], dtype=torch.float64, requires_grad=True)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    names = list(leaves)

    def fn(*args):
        state = dict(zip(names, args[: len(names)], strict=True))
        z_prev, z_below = args[len(names) : len(names) + 2]
        lw = unflatten(list(args[len(names) + 2 :]), layer_norm, top)
        return step(lw, state, z_prev, z_below, slope=0.1, mode="soft")

    args = [leaves[k] for k in names] + [z_prev, z_below] + flatten(weights)
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_gradcheck_step_boundaries_held_fixed(layer_norm: bool):
    """With binary boundaries given, h and c are smooth in the weights and the state (z is left out: its
    forward is a step, its backward the straight-through estimate, which finite differences cannot see)."""
    weights, inputs = make_weights(layer_norm), make_inputs()
    z_prev, z_below = column(1.0, 0.0, 0.0), column(1.0, 1.0, 0.0)  # FLUSH, UPDATE, COPY rows
    tensors = [inputs["h_below"], inputs["h_prev"], inputs["c_prev"], inputs["h_above"]]
    tensors = [t.clone().requires_grad_() for t in tensors]

    def fn(h_below, h_prev, c_prev, h_above, *flat):
        lw = unflatten(list(flat), layer_norm, top=False)
        h, c, _ = reference_step(lw, h_below, z_below, h_prev, c_prev, z_prev, h_above, 1.0, "step")
        return h, c

    assert torch.autograd.gradcheck(fn, tensors + flatten(weights), fast_mode=True)


def test_blend_sends_the_straight_through_gradient_into_the_choice_of_operation():
    """z_prev and z_below receive gradient through the blend (not only through the masked inputs)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(B, 4 * H + 1, generator=gen, dtype=torch.float64)
    h_prev, c_prev = torch.randn(B, H, generator=gen, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)
    z_prev = column(0.0, 1.0).requires_grad_()
    z_below = column(1.0, 0.0, 0.0).requires_grad_()
    h, c, z = blend(s, h_prev, c_prev, z_prev, z_below, None, None, True, 1.0)
    grads = torch.autograd.grad((h.sum() + c.sum() + z.sum()), (z_prev, z_below))
    assert all(g.abs().sum() > 0 for g in grads)
