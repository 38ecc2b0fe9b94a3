"""Boundary options: the forget gate's initial bias under layer norm, the boundary detector's initial
bias, the boundary pre-activations zhat in the model's output (fast path against the reference, float64, with
the gradient a loss on zhat sends back), and the binomial boundary-rate prior: its value, its config, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import assert_close64, params_equal, run_hmlm, small_config, use_kernels, write_config

from hmlm import HMLSTM, CharLM, HMLSTMState, ModelConfig
from hmlm.cell import gate_layer_norm, preactivation
from hmlm.checkpoint import load_trained
from hmlm.config import from_dict
from hmlm.data import prepare_dataset
from hmlm.errors import UserError
from hmlm.model.prior import PriorConfig, binomial_nll, boundary_prior, soft_boundaries
from hmlm.training.trainer import train

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]


# ---- initialisation ----------------------------------------------------------------------------------------------


def forget_gate_preactivations(rnn: HMLSTM, layer: int = 0) -> torch.Tensor:
    """f's pre-activation after the gate layer norm, (B, H), for a random step of a fresh model."""
    torch.manual_seed(3)
    weights = rnn.layer_weights(layer)
    B, H = 256, rnn.hidden_sizes[layer]
    h_above = torch.randn(B, rnn.hidden_sizes[layer + 1]) if layer < rnn.num_layers - 1 else None
    s = preactivation(weights, torch.randn(B, rnn.below_sizes[layer]), torch.ones(B, 1), torch.randn(B, H),
                      torch.ones(B, 1), h_above)  # fmt: skip
    gates = s[:, : 4 * H]
    if weights.ln_gates is not None:
        gates = gate_layer_norm(gates, weights.ln_gates)
    return gates[:, :H]


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
def test_the_forget_gate_starts_at_sigm_1_with_or_without_layer_norm(layer_norm: bool):
    torch.manual_seed(0)
    rnn = HMLSTM(8, [16, 16, 16], layer_norm=layer_norm)
    for layer in range(3):
        f = forget_gate_preactivations(rnn, layer)
        if layer_norm:
            # The layer norm leaves each row of the block with mean 0; what the forget gate starts from is the bias
            # after it: the row means are exactly 1, and the gate is open well beyond 1/2 on average.
            torch.testing.assert_close(f.mean(1), torch.ones(f.shape[0]))
            assert torch.sigmoid(f).mean() > 0.65
        else:
            assert torch.sigmoid(f).mean() > 0.65
    if layer_norm:
        # The bias of s holds nothing for f (it would be removed): the 1 lives in the layer norm's f block only.
        assert all(not b[:h].any() for b, h in zip(rnn.bias, rnn.hidden_sizes, strict=True))
        assert all((ln[0] == 1).all() and not ln[1:].any() for ln in rnn.ln_gates_bias)


def test_a_bias_before_the_gate_layer_norm_would_be_removed():
    """Why the forget gate's 1 lives after the layer norm: added to s before it, it changes nothing."""
    torch.manual_seed(0)
    rnn = HMLSTM(8, [16, 16], layer_norm=True)
    before = forget_gate_preactivations(rnn)
    with torch.no_grad():
        rnn.bias[0][:16] += 1.0
    torch.testing.assert_close(forget_gate_preactivations(rnn), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [0.0, -1.5])
def test_boundary_bias_sets_the_initial_bias_of_every_boundary_detector(bias: float):
    model = CharLM(10, ModelConfig(embed_dim=8, hidden_sizes=[16, 16, 16], output_embed_dim=8, boundary_bias=bias))
    rows = [b.detach() for b in model.rnn.bias]
    assert rows[0][64].item() == bias and rows[1][64].item() == bias and len(rows[2]) == 64  # the top has none
    out = model(torch.randint(0, 10, (4, 30)))
    if bias < 0:  # zhat starts below 0 on most steps: the layers start firing rarely
        assert out.boundaries[..., 0].mean() < 0.2


# ---- zhat in the output: fast path against the reference ---------------------------------------------------------


def make_rnn(sizes: list[int], layer_norm: bool, mode: str, cell: str = "hmlm") -> HMLSTM:
    torch.manual_seed(0)
    rnn = HMLSTM(6, sizes, layer_norm=layer_norm, boundary=mode, cell=cell).to(F64)
    with torch.no_grad():
        for p in rnn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return rnn


def random_state(sizes: list[int], batch: int) -> HMLSTMState:
    gen = torch.Generator().manual_seed(1)
    h = [torch.randn(batch, s, generator=gen, dtype=F64) for s in sizes]
    c = [torch.randn(batch, s, generator=gen, dtype=F64) for s in sizes]
    z = [torch.randint(0, 2, (batch, 1), generator=gen).to(F64) for _ in sizes]
    z[-1].zero_()
    return HMLSTMState(h, c, z)


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("sizes", [[7, 5], [7, 5, 3]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "ln"])
@pytest.mark.parametrize("mode", ["step", "soft"])
@pytest.mark.parametrize("cell", ["hmlm", "seed"])
def test_zhat_and_the_prior_gradient_are_the_same_on_both_paths(fused, sizes, layer_norm, mode, cell, monkeypatch):
    """The reference keeps each step's zhat from the cell; the fast path computes it again from its outputs. Both
    give the same zhat, and a loss on the soft boundaries (the prior) sends back the same gradients: equal in
    float64, at a slope with no float32 value (2.1)."""
    use_kernels(monkeypatch, "cpu" if fused == "1" else "torch")
    rnn = make_rnn(sizes, layer_norm, mode, cell)
    B, T = 4, 9
    x = torch.randn(B, T, 6, dtype=F64)
    state = random_state(sizes, B)
    prior = PriorConfig(rates=[0.3, 0.05][: len(sizes) - 1], weights=[1.0, 2.0][: len(sizes) - 1])
    results = {}
    for impl in ("fast", "reference"):
        rnn.impl = impl
        x_ = x.clone().requires_grad_()
        state_ = HMLSTMState(*([t.clone().requires_grad_() for t in part] for part in state))
        out = rnn(x_, state_, slope=2.1, with_zhat=True)
        term, _ = boundary_prior(prior, out.zhat, out.boundaries, state_.z, slope=2.1, cell=cell)
        leaves = [*rnn.parameters(), x_, *state_.h, *state_.c]
        results[impl] = (out.zhat, term, torch.autograd.grad(term, leaves, allow_unused=True))
    (zf, tf, gf), (zr, tr, gr) = results["fast"], results["reference"]
    assert zf.shape == (B, T, len(sizes) - 1)
    assert_close64(zf, zr)
    assert_close64(tf, tr)
    names = [n for n, _ in rnn.named_parameters()] + ["x"] + [f"h{i}" for i in range(len(sizes))] * 2
    for name, mine, theirs in zip(names, gf, gr, strict=True):
        if theirs is None:
            assert mine is None or not mine.any(), name
            continue
        assert_close64(mine, theirs, msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert gr[0].abs().sum() > 0, "the prior reaches the first layer's weights"


def test_zhat_is_the_boundary_detectors_preactivation():
    """z = 1[zhat > 0] on every step that is not a COPY, and only when asked for is zhat computed."""
    rnn = make_rnn([7, 5, 3], False, "step")
    x = torch.randn(3, 11, 6, dtype=F64)
    out = rnn(x, with_zhat=True)
    assert rnn(x).zhat is None
    first = out.boundaries[..., 0]  # layer 1 never copies
    assert torch.equal(first, (out.zhat[..., 0] > 0).to(F64))
    fired = out.boundaries[..., 1] > 0
    assert (out.zhat[..., 1][fired] > 0).all()
    lstm = CharLM(5, ModelConfig(kind="lstm", embed_dim=4, hidden_sizes=[8], output_embed_dim=4))
    assert lstm(torch.zeros(1, 3, dtype=torch.long), with_zhat=True).zhat is None


# ---- the prior ---------------------------------------------------------------------------------------------------


def test_binomial_nll_is_the_binomial_log_likelihood_and_smallest_at_the_rate():
    n, rate = 50, 0.2
    counts = torch.arange(0, n + 1, dtype=F64)
    expected = -torch.distributions.Binomial(n, probs=torch.tensor(rate, dtype=F64)).log_prob(counts)
    torch.testing.assert_close(binomial_nll(counts, n, rate), expected)
    fine = torch.linspace(0, n, 501, dtype=F64)
    assert abs(fine[binomial_nll(fine, n, rate).argmin()].item() - n * rate) < 1.0  # the mode, between 9.5 and 10.5


def test_soft_boundaries_count_only_steps_that_can_open_one():
    """p = keep * sigm(a zhat): on a COPY (layer below silent, this layer did not just close) no boundary can open."""
    zhat = torch.full((1, 4, 2), 3.0, dtype=F64)
    z = torch.tensor([[[1, 0], [0, 1], [0, 0], [1, 0]]], dtype=F64)  # (B, T, L-1)
    p = soft_boundaries(zhat, z, [torch.zeros(1, 1, dtype=F64)] * 3, slope=1.0)
    s = torch.sigmoid(torch.tensor(3.0, dtype=F64))
    # layer 1 always computes; layer 2 at t: keep = z2_{t-1} + (1 - z2_{t-1}) z1_t
    torch.testing.assert_close(p[0, :, 0], torch.full((4,), s.item(), dtype=F64))
    torch.testing.assert_close(p[0, :, 1], torch.tensor([1, 0, 1, 1], dtype=F64) * s)
    # The seed's cell can open one on a COPY as well: every step counts.
    seed = soft_boundaries(zhat, z, [torch.zeros(1, 1, dtype=F64)] * 3, slope=1.0, cell="seed")
    torch.testing.assert_close(seed, torch.full((1, 4, 2), s.item(), dtype=F64))


def test_the_hard_count_is_the_number_of_boundaries_with_the_soft_gradient():
    gen = torch.Generator().manual_seed(0)
    zhat = torch.randn(3, 20, 2, generator=gen, dtype=F64, requires_grad=True)
    z = (zhat.detach() > 0).to(F64)
    z[..., 1] *= z[..., 0]  # layer 2 fires only where it can (here: where layer 1 fired)
    z0 = [torch.ones(3, 1, dtype=F64)] * 3
    hard = soft_boundaries(zhat, z, z0, slope=2.0, count="hard")
    assert torch.equal(hard.detach(), z)  # the values: exactly the boundaries drawn
    weights = torch.randn(3, 20, 2, generator=gen, dtype=F64)
    (grad_hard,) = torch.autograd.grad((hard * weights).sum(), zhat)
    (grad_soft,) = torch.autograd.grad((soft_boundaries(zhat, z, z0, 2.0, "soft") * weights).sum(), zhat)
    torch.testing.assert_close(grad_hard, grad_soft)  # the gradient: the soft probabilities'


def test_the_prior_pulls_the_rate_towards_its_target():
    """One gradient step on the prior alone lowers a layer that fires too often and raises one that fires too
    rarely."""
    zhat = torch.tensor([[[2.0, -2.0]] * 40], dtype=F64, requires_grad=True)  # layer 1 fires on every step
    z = (zhat.detach() > 0).to(F64)
    z[..., 1] = 0
    term, parts = boundary_prior(PriorConfig(rates=[0.2, 0.2]), zhat, z, None, slope=1.0)
    term.backward()
    assert zhat.grad[..., 0].min() > 0  # descending lowers zhat of layer 1
    # layer 2 is a COPY on every step here (layer 1 fired, so keep = 1): its zhat is pushed up
    assert zhat.grad[..., 1].max() < 0
    assert len(parts) == 2 and all(p > 0 for p in parts)


BASE = {"model": {"hidden_sizes": [8, 8, 8]}}


@pytest.mark.parametrize(
    ("prior", "model", "key"),
    [
        ({"rates": [0.2, 1.0]}, {}, "prior.rates[1]"),
        ({"rates": [0.0, 0.1]}, {}, "prior.rates[0]"),
        ({"rates": [0.2, 0.03], "weights": [1.0, -0.5]}, {}, "prior.weights[1]"),
        ({"rates": [0.2]}, {}, "prior.rates must hold one rate per lower layer"),
        ({"rates": [0.2]}, {"hidden_sizes": [8]}, "prior.rates: a boundary-rate prior needs"),
        ({"rates": [0.2]}, {"kind": "lstm", "hidden_sizes": [8, 8]}, "prior.rates: a boundary-rate prior needs"),
        ({"rates": [0.2, 0.03], "count": "both"}, {}, "prior.count"),
        ({"rates": [0.2, 0.03], "start": -1}, {}, "prior.start"),
        ({"rates": [0.2, 0.03], "ramp": -5}, {}, "prior.ramp"),
    ],
)
def test_a_bad_prior_fails_naming_the_key(prior: dict, model: dict, key: str):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
        from_dict({"model": {**BASE["model"], **model}, "prior": prior})


def test_the_prior_is_off_by_default_and_shown_by_config_show():
    assert not from_dict({}).prior.enabled
    assert not from_dict({"model": {"hidden_sizes": [8]}, "prior": {"rates": [], "weights": [2.0, 1.0]}}).prior.enabled
    shown = run_hmlm("config", "show", "-c", "configs/tiny.yaml", "-s", "prior.rates=[0.2,0.03]", cwd=REPO)
    assert "prior:\n  rates:\n  - 0.2\n  - 0.03\n  weights: []" in shown.stdout
    assert "boundary_bias: 0.0" in shown.stdout
    bad = run_hmlm("config", "show", "-c", "configs/tiny.yaml", "-s", "prior.rates=[0.2,1.5]", cwd=REPO, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "prior.rates[1]" in bad.stderr


def test_the_prior_starts_at_its_step_and_ramps_its_weight_up():
    prior = PriorConfig(rates=[0.2, 0.03], start=10, ramp=4)
    assert [prior.scale_at(step) for step in (0, 9, 10, 11, 12, 13, 14, 500)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [PriorConfig(rates=[0.2], start=3).scale_at(step) for step in (2, 3, 4)] == [0, 1, 1]
    assert PriorConfig(rates=[0.2]).scale_at(0) == 1
    assert PriorConfig(start=0).scale_at(5) == 0  # off: no rates


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    return data


def test_training_with_the_prior_logs_it_apart_and_bpc_stays_the_lm_loss(data_dir, tmp_path):
    """With a weight that makes the prior's term far larger than the LM loss, the logged loss and bpc are still
    the LM loss alone (near chance after 8 steps), and the prior's terms are logged on their own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(data_dir, max_steps=8, eval_every=8, log_every=4, sample_length=0)
    config.prior = PriorConfig(rates=[0.01, 0.01], weights=[1000.0, 1000.0])
    train(config, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/boundary_prior_layer1", "train/boundary_prior_layer2", "train/loss", "valid/bpc"} <= tags
    prior = [e.value for e in events.Scalars("train/boundary_prior_layer1")]
    loss = [e.value for e in events.Scalars("train/loss")]
    bpc = [e.value for e in events.Scalars("train/bpc")]
    assert len(prior) == len(loss) == 2 and all(math.isfinite(v) for v in prior)
    assert all(1000 * p > 10 for p in prior[:1])  # the weighted term dwarfs the LM loss at first
    assert all(v < math.log(20) + 0.5 for v in loss)  # ... which the logged loss does not include
    assert bpc == pytest.approx([v / math.log(2) for v in loss])


def test_a_prior_on_a_one_layer_model_exits_2(data_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", data_dir)
    result = run_hmlm("train", "-c", str(config), "-s", "model.hidden_sizes=[16]", "-s", "prior.rates=[0.2]",
                      "--run-dir", "r", cwd=tmp_path, check=False)  # fmt: skip
    assert result.returncode == 2 and "prior.rates" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_prior_that_has_not_started_leaves_training_as_without_it(data_dir, tmp_path):
    """Before prior.start the boundaries are free: 4 steps with a prior from step 100 give exactly the weights of 4
    steps without a prior, and log no prior term; the same prior from step 2 changes them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def weights(name: str, prior: PriorConfig) -> dict:
        config = small_config(data_dir, max_steps=4, eval_every=4, log_every=2, sample_length=0)
        config.prior = prior
        train(config, tmp_path / name, progress=False)
        return load_trained(tmp_path / name).model.state_dict()

    free = weights("free", PriorConfig())
    late = weights("late", PriorConfig(rates=[0.01, 0.01], weights=[1000.0, 1000.0], start=100))
    early = weights("early", PriorConfig(rates=[0.01, 0.01], weights=[1000.0, 1000.0], start=2))
    assert params_equal(free, late)
    assert not params_equal(free, early)
    tags = set(EventAccumulator(str(tmp_path / "late")).Reload().Tags()["scalars"])
    assert "train/loss" in tags and "train/boundary_prior_layer1" not in tags
    assert "train/boundary_prior_layer1" in EventAccumulator(str(tmp_path / "early")).Reload().Tags()["scalars"]
