"""model.cell: seed, the cell of lucaslingle/hm_lstm (hmlm/cell.py): its rule on single steps of the reference (a
boundary on a COPY step, no gradient through the choice of operation), its parameters and initialization, COPY
skipping under it, the config's bad inputs and the checkpoints. The fast paths against the reference under it are
in tests/test_model.py (C++, torch ops) and tests/test_kernels_triton.py (Triton); against the seed's own TensorFlow
code in tests/test_seed_tf.py."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close64, run_hmlm, small_config, use_kernels, write_config

from hmlm import HMLSTM, CharLM, ModelConfig, load_model
from hmlm.analysis.sample import generate_ids
from hmlm.cell import LayerWeights, reference_step
from hmlm.checkpoint import load_checkpoint
from hmlm.fast import copy_skip
from hmlm.training.trainer import train

F64 = torch.float64
H, D, A = 4, 3, 5


def copy_step_inputs(zhat_sign: float):
    """One step of a middle layer that COPIES (z_prev = z_below = 0), whose detector reads only h_prev: zhat = the
    recurrent row . h_prev, with the sign asked for. Every input a leaf, for gradients."""
    gen = torch.Generator().manual_seed(0)
    rows = 4 * H + 1
    weights = LayerWeights(
        w_below=torch.randn(rows, D, generator=gen, dtype=F64),
        u_rec=torch.randn(rows, H, generator=gen, dtype=F64),
        u_above=torch.randn(rows, A, generator=gen, dtype=F64),
        bias=torch.zeros(rows, dtype=F64),
        ln_gates=None,
        ln_cell=None,
    )
    h_prev = torch.randn(1, H, generator=gen, dtype=F64)
    weights.u_rec[4 * H] = zhat_sign * h_prev[0]  # zhat = sign * |h_prev|^2
    inputs = {
        "h_below": torch.randn(1, D, generator=gen, dtype=F64),
        "z_below": torch.zeros(1, 1, dtype=F64),
        "h_prev": h_prev,
        "c_prev": torch.randn(1, H, generator=gen, dtype=F64),
        "z_prev": torch.zeros(1, 1, dtype=F64),
        "h_above": torch.randn(1, A, generator=gen, dtype=F64),
    }
    return weights, {name: t.requires_grad_() for name, t in inputs.items()}


@pytest.mark.parametrize("mode", ["step", "soft"])
def test_a_seed_layer_opens_a_boundary_on_a_copy_step_from_h_prev_alone(mode: str):
    weights, inputs = copy_step_inputs(+1.0)
    for cell, opens in (("hmlm", False), ("seed", True)):
        h, c, z = reference_step(weights, **inputs, slope=2.0, mode=mode, cell=cell)
        assert torch.equal(h, inputs["h_prev"]) and torch.equal(c, inputs["c_prev"])  # a COPY either way
        assert (z.item() > 0) == opens, cell
    # From a zhat below zero the seed's COPY keeps z = 0 (step), as hmlm's does.
    weights, inputs = copy_step_inputs(-1.0)
    assert reference_step(weights, **inputs, slope=2.0, cell="seed")[2].item() == 0


def test_the_seed_passes_no_gradient_through_the_choice_of_operation():
    """With h_below = h_above = 0 the masks of s pass no gradient to z_below and z_prev, so all their gradient is
    the choice of operation's: none in the seed's cell, some in hmlm's."""
    for cell in ("hmlm", "seed"):
        weights, inputs = copy_step_inputs(+1.0)
        with torch.no_grad():
            inputs["h_below"].zero_(), inputs["h_above"].zero_()
        h, c, z = reference_step(weights, **inputs, slope=2.0, cell=cell)
        loss = h.sum() + c.pow(2).sum() + 3 * z.sum()
        g_prev, g_below, g_h = torch.autograd.grad(loss, [inputs["z_prev"], inputs["z_below"], inputs["h_prev"]])
        if cell == "seed":
            assert g_prev.item() == 0 and g_below.item() == 0
        else:
            assert g_prev.abs().item() > 1e-3 and g_below.abs().item() > 1e-3
        assert g_h.abs().sum() > 0  # h_prev still gets its gradient, through COPY and the detector


def test_a_seed_model_has_the_seed_s_parameters_and_initialization():
    torch.manual_seed(0)
    sizes = [8, 8, 8]
    model = CharLM(11, ModelConfig(embed_dim=5, hidden_sizes=sizes, output_embed_dim=7, layer_norm=False, cell="seed"))
    rnn = model.rnn
    for layer, weight in enumerate(rnn.weight):
        bias = rnn.bias[layer]
        assert bias.shape == (4 * 8,)  # no detector bias
        assert torch.equal(bias[:8], torch.ones(8)) and not bias[8:].any()  # the forget gate's +1, as the seed's
        gates = weight[: 4 * 8]  # orthonormal columns (the seed's kernel, transposed; the top one's subset of them)
        torch.testing.assert_close(gates.T @ gates, torch.eye(gates.shape[1]), atol=1e-5, rtol=0)
        if layer < 2:
            limit = (6.0 / (weight.shape[1] + 1)) ** 0.5  # Glorot-uniform, fan in + fan out
            assert weight[4 * 8].abs().max() <= limit and weight[4 * 8].abs().max() > limit / 2
        else:
            assert weight.shape[0] == 4 * 8
    assert model.output.gate.bias is None  # eq. 11, and the seed: no bias
    default = CharLM(11, ModelConfig(embed_dim=5, hidden_sizes=sizes, output_embed_dim=7, layer_norm=False))
    assert default.rnn.bias[0].shape == (4 * 8 + 1,) and default.output.gate.bias is not None
    # The two cells hold different parameters: one's state dict does not load into the other.
    with pytest.raises(RuntimeError):
        default.load_state_dict(model.state_dict())


def test_the_seed_cell_with_layer_norm_keeps_the_forget_bias_after_the_normalization():
    rnn = HMLSTM(5, [6, 4], layer_norm=True, cell="seed")
    assert torch.equal(rnn.ln_gates_bias[0][0], torch.ones(6)) and not rnn.bias[0].any()


def seed_lm(mode: str, layer_norm: bool, dtype=F64, seed: int = 3) -> CharLM:
    torch.manual_seed(seed)
    config = ModelConfig(embed_dim=6, hidden_sizes=[12, 10, 8], output_embed_dim=9, layer_norm=layer_norm,
                         boundary=mode, cell="seed")  # fmt: skip
    model = CharLM(11, config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def opened_on_copy(boundaries: torch.Tensor, start: torch.Tensor) -> int:
    """How many times a layer above the first opened a boundary on a step where it copied: (B, T, L-1) boundaries,
    start (B, L-1) the boundaries before the first step."""
    previous = torch.cat([start[:, None], boundaries[:, :-1]], dim=1)  # z^l_{t-1}
    below = boundaries[..., :-1]  # z^{l-1}_t for l >= 2
    copies = (previous[..., 1:] == 0) & (below == 0)
    return int((copies & (boundaries[..., 1:] > 0)).sum())


@pytest.fixture
def kernels_env(monkeypatch):
    """The C++ kernels, the CPU's default: skipping is the same code whatever the backend, and every backend equals
    the reference under the seed's cell (tests/test_model.py, tests/test_kernels_triton.py)."""
    use_kernels(monkeypatch, "cpu")


def skipping_and_not(model: CharLM, tokens: torch.Tensor, monkeypatch) -> tuple[int, int, int]:
    """Two calls with the state carried, without skipping and with it: the outputs equal in float64. Returns, over
    the layers above the first, the COPY steps, those skipped, and the boundaries opened on a COPY."""
    outputs = {}
    for skip in ("0", "1"):
        monkeypatch.setenv("HMLM_SKIP_COPY", skip)
        copy_skip.COUNTS.reset()
        with torch.no_grad():
            first = model(tokens[:, :17], slope=2.1)
            second = model(tokens[:, 17:], first.state, slope=2.1)
        outputs[skip] = (first, second)
    for a, b in zip(outputs["0"], outputs["1"], strict=True):
        assert torch.equal(a.boundaries, b.boundaries)
        for mine, theirs in zip([a.logits, *a.state.h, *a.state.c], [b.logits, *b.state.h, *b.state.c], strict=True):
            assert_close64(mine, theirs)
    first, second = outputs["1"]
    start = torch.cat(first.state.z[:-1], dim=1)  # (B, L-1): where the second call starts
    opened = opened_on_copy(first.boundaries, torch.zeros_like(start)) + opened_on_copy(second.boundaries, start)
    counts = copy_skip.COUNTS
    return sum(counts.copies[1:]), sum(counts.skipped[1:]), opened


@pytest.mark.parametrize("mode", ["step", "soft"])
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_skipping_copy_steps_gives_the_seed_s_values_in_float64(mode, layer_norm, batch, kernels_env, monkeypatch):
    """The first COPY after a step that computed computes (its boundary may open); later ones are skipped. Two
    models (their seeds chosen so): in one COPY steps are skipped and others not, in the other a boundary opens on
    a COPY step; both equal the path without skipping."""
    monkeypatch.setattr(copy_skip, "GATHER_FRACTION", 1.0)  # gather at this small size (tests/test_inference.py)
    tokens = torch.randint(0, 11, (batch, 40), generator=torch.Generator().manual_seed(1))
    copies, skipped, _ = skipping_and_not(seed_lm(mode, layer_norm, seed=3), tokens, monkeypatch)
    assert 0 < skipped < copies
    assert skipping_and_not(seed_lm(mode, layer_norm, seed=11), tokens, monkeypatch)[2] > 0  # the seed's rule


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sampling_a_seed_model_gives_the_same_text_with_skipping(dtype, kernels_env, monkeypatch):
    model = seed_lm("step", True, dtype)
    texts, counts = {}, None
    for skip in ("0", "1"):
        monkeypatch.setenv("HMLM_SKIP_COPY", skip)
        copy_skip.COUNTS.reset()
        texts[skip] = list(generate_ids(model, [1, 2, 3], 200, generator=torch.Generator().manual_seed(5)))
        counts = copy_skip.COUNTS
    assert texts["0"] == texts["1"]
    assert all(0 < s < c for s, c in zip(counts.skipped[1:], counts.copies[1:], strict=True))


def test_bad_cells_are_one_line_and_exit_2(data_dir, tmp_path):
    config = write_config(tmp_path / "c.yaml", data_dir)
    for overrides, expected in (
        (["model.cell=tf"], "model.cell must be one of hmlm, seed, not 'tf'"),
        (["model.cell=seed", "model.kind=lstm"], "model.cell must be hmlm for kind: lstm (hmlm, seed are HM-LSTM"),
        (["model.cell=seed", "model.boundary_bias=-1"], "model.boundary_bias must be 0 with model.cell: seed"),
    ):
        args = [x for o in overrides for x in ("-s", o)]
        result = run_hmlm("train", "-c", str(config), *args, "--run-dir", "never", cwd=tmp_path, check=False)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "never").exists()


def test_checkpoints_record_the_cell_and_an_old_one_loads_as_hmlm(data_dir, tmp_path):
    config = small_config(data_dir, max_steps=2, eval_every=2)
    config.model.cell = "seed"
    train(config, tmp_path / "seed", progress=False)
    payload = load_checkpoint(tmp_path / "seed" / "checkpoints" / "last.pt")
    assert payload["config"]["model"]["cell"] == "seed"
    model, _ = load_model(tmp_path / "seed", checkpoint="last")
    assert model.config.cell == "seed" and model.rnn.cell == "seed" and model.output.gate.bias is None

    # A checkpoint from before model.cell existed has no such key: hmlm's cell is what it trained.
    train(small_config(data_dir, max_steps=2, eval_every=2), tmp_path / "old", progress=False)
    old = tmp_path / "old" / "checkpoints" / "last.pt"
    payload = load_checkpoint(old)
    del payload["config"]["model"]["cell"]
    torch.save(payload, old)
    model, _ = load_model(old)
    assert model.config.cell == "hmlm" and model.rnn.bias[0].shape[0] == 4 * model.rnn.hidden_sizes[0] + 1
    assert torch.isfinite(model(torch.zeros(1, 3, dtype=torch.long)).logits).all()
