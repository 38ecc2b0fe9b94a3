"""hmlm's `cell="seed"` against the seed's own TensorFlow code (lucaslingle/hm_lstm), on the same weights and inputs:
every layer's h, the boundaries and the final state at every step, the output embedder's h^e, and the gradients of
one loss w.r.t. the inputs and every weight, equal to 1e-12 in float64.

The seed has no license, so none of its code is in hmlm: this test reads it from a clone named by HMLM_SEED_REPO and
runs it under TensorFlow 2's tf.compat.v1, changing only its import lines (REWRITES, below). It skips where
HMLM_SEED_REPO is not set or TensorFlow is not installed (CI installs neither). To run it:

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    /tmp/tfenv/bin/pip install tensorflow-cpu
    /tmp/tfenv/bin/pip install tf-keras --no-deps
    /tmp/tfenv/bin/pip install -e . pytest           # in this checkout
    git clone https://github.com/lucaslingle/hm_lstm /tmp/hm_lstm_seed
    HMLM_SEED_REPO=/tmp/hm_lstm_seed /tmp/tfenv/bin/python -m pytest -q tests/test_seed_tf.py

(as tested: TensorFlow 2.21, torch 2.13. torch first, so that tensorflow-cpu's dependencies settle around it, and
tf-keras without dependencies, so that it changes neither. This test itself does not need tf-keras: the seed's legacy
RNN cells and tf.layers.dense come from TensorFlow's own tensorflow.python.keras.)
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import use_kernels

from hmlm import HMLSTM
from hmlm.model.charlm import OutputModule

F64 = torch.float64
B, T, D, H, L, E_OUT, VOCAB = 8, 12, 5, 6, 3, 7, 11  # batch, steps, input size, hidden size, layers, h^e size
SLOPE = 2.1
FORGET_BIAS = 1.0  # HM_LSTM_Cell's default: f = sigmoid(f + 1.0)
TOL = 1e-12
# The legacy layers the seed is built on warn that they are deprecated, once per API
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated:UserWarning:tensorflow")
# TensorFlow's graph seed (the seed's initial weights): with it about half the steps open a boundary at layers 1 and
# 2, and layer 2 opens some on COPY steps (test_the_seed_opens_boundaries_on_copy_steps)
TF_SEED = 3

SEED_FILES = ("utils", "HM_LSTM_Cell", "Multi_HM_LSTM_Cell", "HM_LSTM_Output_Embedder")
PACKAGE = "_hm_lstm_seed"  # the seed's files become the modules _hm_lstm_seed.<file>

# The only changes made to the seed's source: these whole import lines are replaced (each must occur, or the load
# fails); every other line, imports included, runs as written (TensorFlow 2.21 still has tensorflow.python.layers.base
# and tensorflow.python.ops.rnn_cell_impl, which now come from tensorflow.python.keras's legacy layers).
REWRITES = {
    # TF1's API, tf.compat.v1, with tf.float32 meaning float64, tf.zeros / tf.ones making float64 by default (the
    # seed's zero_state gives no dtype), the Python floats of tf.maximum / tf.minimum float64, and tf.layers.dense
    # from the legacy layers (see seed_tf below).
    "import tensorflow as tf": "tf = _seed_tf",
    # the seed's own utils.py, loaded as a module of the package above
    "from utils import HM_LSTM_InputTuple, HM_LSTM_StateTuple":
        f"from {PACKAGE}.utils import HM_LSTM_InputTuple, HM_LSTM_StateTuple",
    # tensorflow.python.util.nest, with is_sequence, the old name of is_nested
    "from tensorflow.python.util import nest": "nest = _seed_nest",
}  # fmt: skip


def seed_tf(tf) -> types.ModuleType:
    """What the seed's `tf` name is bound to: tf.compat.v1, except float32 is float64, tf.zeros / tf.ones default to
    float64, tf.maximum / tf.minimum take a Python float as float64 (TensorFlow converts a number given as the first
    argument on its own, to float32), and tf.layers.dense is the legacy functional layer (tf.compat.v1.layers
    refuses under Keras 3)."""
    from tensorflow.python.keras.legacy_tf_layers import core as legacy_layers

    v1 = tf.compat.v1

    class TF1InFloat64(types.ModuleType):
        def __getattr__(self, name: str):
            return getattr(v1, name)

    shim = TF1InFloat64("tf")
    shim.float32 = v1.float64
    shim.zeros = lambda shape, dtype=v1.float64, name=None: v1.zeros(shape, dtype=dtype, name=name)
    shim.ones = lambda shape, dtype=v1.float64, name=None: v1.ones(shape, dtype=dtype, name=name)
    shim.layers = types.SimpleNamespace(dense=legacy_layers.dense)

    def float64_literals(op):  # a Python float given first would be float32: tf.maximum(0.0, x), tf.minimum(1.0, x)
        def call(x, y, name=None):
            x, y = (v1.constant(v, v1.float64) if isinstance(v, float) else v for v in (x, y))
            return op(x, y, name=name)

        return call

    shim.maximum, shim.minimum = float64_literals(v1.maximum), float64_literals(v1.minimum)
    return shim


def load_seed(repo: Path, tf) -> types.ModuleType:
    """The seed's four files as modules, their import lines rewritten (REWRITES)."""
    from tensorflow.python.util import nest

    seed_nest = types.SimpleNamespace(is_sequence=nest.is_nested)
    package = types.ModuleType(PACKAGE)
    package.__path__ = []
    sys.modules[PACKAGE] = package
    used = set()
    for name in SEED_FILES:
        path = repo / f"{name}.py"
        lines = path.read_text().splitlines()
        for k, line in enumerate(lines):
            if line.strip() in REWRITES:
                used.add(line.strip())
                lines[k] = line.replace(line.strip(), REWRITES[line.strip()])
        module = types.ModuleType(f"{PACKAGE}.{name}")
        module.__file__ = str(path)
        module._seed_tf, module._seed_nest = seed_tf(tf), seed_nest
        sys.modules[module.__name__] = module
        exec(compile("\n".join(lines) + "\n", str(path), "exec"), module.__dict__)
        setattr(package, name, module)
    assert used == set(REWRITES), f"import lines not found in the seed: {set(REWRITES) - used}"
    return package


def loss_weights() -> dict[str, np.ndarray]:
    """Fixed random weights of the scalar loss: sum(w_e * h^e) + sum_l sum(w_l * h^l), over every step."""
    rng = np.random.default_rng(11)
    weights = {"he": rng.standard_normal((T, B, E_OUT))}
    weights.update({f"h{layer}": rng.standard_normal((T, B, H)) for layer in range(L)})
    return weights


def run_seed(repo: Path) -> dict:
    """The seed's graph, unrolled step by step in Python: every step's states and h^e, the variables as TF
    initialized them (the biases then set to random values), and the gradients of the loss."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TensorFlow's own kernels, as the seed ran
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (the seed's code needs it)")
    from tensorflow.python.framework import tensor_shape

    v1 = tf.compat.v1
    seed = load_seed(repo, tf)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, B, D)) * 2.0
    weights = loss_weights()
    v2_shapes = tensor_shape._TENSORSHAPE_V2_OVERRIDE
    v1.disable_v2_tensorshape()  # the seed reads inputs_shape[1].value, a TF1 Dimension
    try:
        graph = tf.Graph()
        with graph.as_default():
            v1.set_random_seed(TF_SEED)
            x_in = v1.placeholder(tf.float64, [T, B, D])
            slope = v1.placeholder(tf.float64, [])
            cells = [seed.HM_LSTM_Cell.HM_LSTM_Cell(H, slope) for _ in range(L)]
            embedder = seed.HM_LSTM_Output_Embedder.HM_LSTM_Output_Embedder(L, H, E_OUT)
            multi = seed.Multi_HM_LSTM_Cell.Multi_HM_LSTM_Cell(cells, output_embedder=embedder)
            state = multi.zero_state(B, tf.float64)
            he, states = [], []
            for t in range(T):
                he_t, state = multi(x_in[t], state)
                he.append(he_t)
                states.append(state)
            loss = tf.reduce_sum(tf.stack(he) * weights["he"])
            for layer in range(L):
                loss += tf.reduce_sum(tf.stack([s[layer].h for s in states]) * weights[f"h{layer}"])
            variables = v1.trainable_variables()
            names = [v.name for v in variables]
            grads = v1.gradients(loss, [x_in, *variables])
            config = v1.ConfigProto(intra_op_parallelism_threads=1, inter_op_parallelism_threads=1)
            with v1.Session(graph=graph, config=config) as sess:
                sess.run(v1.global_variables_initializer())
                biases = [v for v in variables if "bias" in v.name]  # the seed starts them at 0: random, so that
                sess.run([v.assign(rng.standard_normal(v.shape.as_list()) * 0.5) for v in biases])  # hmlm's +1 counts
                values = sess.run(variables)
                feed = {x_in: x, slope: SLOPE}
                fetched = sess.run(
                    {
                        "he": he,
                        "h": [[s[layer].h for s in states] for layer in range(L)],
                        "c": [[s[layer].c for s in states] for layer in range(L)],
                        "z": [[s[layer].z for s in states] for layer in range(L)],
                        "grads": [g if g is not None else tf.constant(0.0, tf.float64) for g in grads],
                    },
                    feed,
                )
    finally:
        tensor_shape._TENSORSHAPE_V2_OVERRIDE = v2_shapes
        for name in [name for name in sys.modules if name == PACKAGE or name.startswith(PACKAGE + ".")]:
            del sys.modules[name]
    variables = dict(zip(names, values, strict=True))
    grads = dict(zip(["x", *names], fetched.pop("grads"), strict=True))
    return {"x": x, "vars": variables, "grads": grads, **fetched}


def seed_variable(seed: dict, kind: str, name: str) -> torch.Tensor:
    """One of the seed's variables (kind "vars") or its gradient (kind "grads"), by the end of its name."""
    matches = [key for key in seed[kind] if key.endswith(name + ":0")]
    assert len(matches) == 1, (name, sorted(seed[kind]))
    value = np.asarray(seed[kind][matches[0]], dtype=np.float64)
    if kind == "grads" and value.ndim == 0:  # tf.gradients gave None: the loss does not depend on it
        value = np.zeros(np.asarray(seed["vars"][matches[0]]).shape)
    return torch.from_numpy(value)


def layer_matrix(seed: dict, kind: str, layer: int) -> torch.Tensor:
    """hmlm's weight[layer], (rows, D_below + H + H_above), from the seed's kernel (H + H + D_below, 4H) and kernel_z
    (same rows, 1): the seed's rows [h_prev | z_prev h_above | z_below h_below] become hmlm's columns
    [W_below | U_rec | U_above], its columns f, i, o, g (and zhat) hmlm's rows. The top layer has no zhat row and
    no top-down block (the seed's has one, whose input is zeros)."""
    scope = f"cell_{layer}/hm_lstm__cell"
    kernel = seed_variable(seed, kind, f"{scope}/kernel")
    top = layer == L - 1
    if not top:
        kernel = torch.cat([kernel, seed_variable(seed, kind, f"{scope}/kernel_z")], dim=1)
    rec, above, below = kernel[:H], kernel[H : 2 * H], kernel[2 * H :]
    return torch.cat([below, rec] + ([] if top else [above])).T.contiguous()


def layer_bias(seed: dict, kind: str, layer: int) -> torch.Tensor:
    """hmlm's bias[layer] (4H,): the seed's, plus its fixed forget bias in the f block (not in a gradient)."""
    bias = seed_variable(seed, kind, f"cell_{layer}/hm_lstm__cell/bias").clone()
    if kind == "vars":
        bias[:H] += FORGET_BIAS
    return bias


def dense_kernels(seed: dict, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The output embedder's two tf.layers.dense kernels, transposed: OutputModule's gate.weight and embed.weight."""
    kernels = sorted(key for key in seed[kind] if "/dense" in key and key.endswith("kernel:0"))
    assert len(kernels) == 2, sorted(seed[kind])  # one pair, shared by every step
    by_shape = {np.asarray(seed["vars"][key]).shape[1]: key for key in kernels}
    gate, embed = by_shape[L], by_shape[E_OUT]
    return tuple(torch.from_numpy(np.asarray(seed[kind][key], dtype=np.float64)).T for key in (gate, embed))


@pytest.fixture(scope="module")
def seed() -> dict:
    """The seed's numbers, computed once (skips without HMLM_SEED_REPO or TensorFlow)."""
    repo = os.environ.get("HMLM_SEED_REPO")
    if not repo:
        pytest.skip("HMLM_SEED_REPO is not set (a clone of https://github.com/lucaslingle/hm_lstm)")
    path = Path(repo)
    if not all((path / f"{name}.py").is_file() for name in SEED_FILES):
        pytest.fail(f"HMLM_SEED_REPO={repo} is not a clone of lucaslingle/hm_lstm (no {', '.join(SEED_FILES)})")
    return run_seed(path)


def build_hmlm(seed: dict, impl: str, cell: str = "seed") -> tuple[HMLSTM, OutputModule]:
    """hmlm's HM-LSTM and output module, float64, with the seed's weights."""
    rnn = HMLSTM(D, [H] * L, layer_norm=False, impl=impl, cell=cell).to(F64)
    output = OutputModule([H] * L, E_OUT, VOCAB, cell=cell).to(F64)
    with torch.no_grad():
        for layer in range(L):
            rnn.weight[layer].copy_(layer_matrix(seed, "vars", layer))
            bias = rnn.bias[layer]
            bias.zero_()  # the hmlm cell's zhat bias (below the top) stays 0, as the seed has none
            bias[: 4 * H].copy_(layer_bias(seed, "vars", layer))
        gate, embed = dense_kernels(seed, "vars")
        output.gate.weight.copy_(gate)
        output.embed.weight.copy_(embed)
    return rnn, output


def run_hmlm(rnn: HMLSTM, output: OutputModule, x: torch.Tensor):
    """The forward, and h^e (B, T, E_out): the output module's ReLU(...), the input of its logits layer."""
    captured = []
    hook = output.logits.register_forward_hook(lambda module, inputs, result: captured.append(inputs[0]))
    try:
        out = rnn(x, slope=SLOPE)
        output(out.hidden)
    finally:
        hook.remove()
    return out, captured[0]


def seed_steps(seed: dict, key: str, layer: int) -> torch.Tensor:
    """The seed's per-step state `key` of one layer as (B, T, size)."""
    return torch.from_numpy(np.stack(seed[key][layer], axis=1))


def close(mine: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    torch.testing.assert_close(mine, theirs, rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")
    return (mine - theirs).abs().max().item()


def copy_openings(seed: dict) -> torch.Tensor:
    """(B, T, L-1): where the seed's z^l opens a boundary on a COPY step (z^l_t = 1, z^l_{t-1} = 0, z^{l-1}_t = 0),
    where hmlm's own cell would give 0. Layer 1 never copies (z^0 = 1)."""
    z = torch.stack([seed_steps(seed, "z", layer)[..., 0] for layer in range(L - 1)], dim=-1)  # (B, T, L-1)
    z_prev = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)
    z_below = torch.cat([torch.ones_like(z[..., :1]), z[..., :-1]], dim=-1)
    return (z == 1) & (z_prev == 0) & (z_below == 0)


@pytest.fixture(params=["reference", "fast-torch", "fast-cpu"])
def impl(request, monkeypatch) -> str:
    """The reference step, and the fast path with the torch ops and with the C++ CPU kernels (HMLM_KERNELS)."""
    use_kernels(monkeypatch, "cpu" if request.param == "fast-cpu" else "torch")
    return request.param


def test_the_seed_opens_boundaries_on_copy_steps(seed: dict):
    """The inputs exercise what tells the two cells apart: boundaries, COPY steps, and a boundary opened on a COPY."""
    z = torch.stack([seed_steps(seed, "z", layer)[..., 0] for layer in range(L)], dim=-1)
    assert 0 < z[..., : L - 1].mean() < 1
    assert (z[..., L - 1] == 0).all()
    copies = (z[:, :-1, 1] == 0) & (z[:, 1:, 0] == 0)  # layer 2 copies at step t+1
    assert copies.any()
    assert copy_openings(seed).sum() > 0


def test_hmlm_seed_cell_equals_the_seed(seed: dict, impl: str):
    """Forward (every step) and backward, to 1e-12 in float64."""
    rnn, output = build_hmlm(seed, impl.split("-")[0])
    x = torch.from_numpy(seed["x"]).transpose(0, 1).contiguous().requires_grad_()  # (B, T, D)
    out, he = run_hmlm(rnn, output, x)

    forward = []
    for layer in range(L):
        forward.append(close(out.hidden[layer], seed_steps(seed, "h", layer), f"h^{layer + 1}"))
        forward.append(close(out.state.h[layer], seed_steps(seed, "h", layer)[:, -1], f"final h^{layer + 1}"))
        forward.append(close(out.state.c[layer], seed_steps(seed, "c", layer)[:, -1], f"final c^{layer + 1}"))
        forward.append(close(out.state.z[layer], seed_steps(seed, "z", layer)[:, -1], f"final z^{layer + 1}"))
    for layer in range(L - 1):
        forward.append(close(out.boundaries[..., layer], seed_steps(seed, "z", layer)[..., 0], f"z^{layer + 1}"))
    forward.append(close(he, torch.from_numpy(np.stack(seed["he"], axis=1)), "h^e"))

    weights = {key: torch.from_numpy(value).transpose(0, 1) for key, value in loss_weights().items()}
    loss = (he * weights["he"]).sum() + sum((out.hidden[k] * weights[f"h{k}"]).sum() for k in range(L))
    params = [*rnn.weight, *rnn.bias, output.gate.weight, output.embed.weight]
    grads = torch.autograd.grad(loss, [x, *params])
    expected = [
        torch.from_numpy(seed["grads"]["x"]).transpose(0, 1),
        *(layer_matrix(seed, "grads", layer) for layer in range(L)),
        *(layer_bias(seed, "grads", layer) for layer in range(L)),
        *dense_kernels(seed, "grads"),
    ]
    names = ["x", *(f"weight[{k}]" for k in range(L)), *(f"bias[{k}]" for k in range(L)), "gate", "embed"]
    backward = [close(g, e, f"d loss / d {n}") for g, e, n in zip(grads, expected, names, strict=True)]
    # The seed's top layer: its top-down block sees only zeros, and its z is replaced by 0, so no gradient reaches
    # either (what hmlm drops).
    top = f"cell_{L - 1}/hm_lstm__cell"
    assert (seed_variable(seed, "grads", f"{top}/kernel")[H : 2 * H] == 0).all()
    assert (seed_variable(seed, "grads", f"{top}/kernel_z") == 0).all()

    with torch.no_grad():  # without gradients the fast path skips the work of rows that copy
        plain, he_plain = run_hmlm(rnn, output, x)
    for layer in range(L):
        close(plain.hidden[layer], seed_steps(seed, "h", layer), f"h^{layer + 1} without gradients")
    close(plain.boundaries, out.boundaries, "boundaries without gradients")
    close(he_plain, he, "h^e without gradients")
    print(f"\n{impl}: max |hmlm - seed| forward {max(forward):.3g}, gradients {max(backward):.3g}")


def test_hmlm_own_cell_differs_from_the_seed(seed: dict):
    """hmlm's default cell on the same weights does not open a boundary on a COPY step, so it parts from the seed at
    the first such step: the test above cannot pass by accident."""
    rnn, output = build_hmlm(seed, "reference", cell="hmlm")
    x = torch.from_numpy(seed["x"]).transpose(0, 1).contiguous()
    with torch.no_grad():
        out, _ = run_hmlm(rnn, output, x)
    openings = copy_openings(seed)
    assert (out.boundaries[openings] == 0).all()
    seed_z = torch.stack([seed_steps(seed, "z", layer)[..., 0] for layer in range(L - 1)], dim=-1)
    first = openings.any(0).any(-1).nonzero()[0].item()  # the first step where the seed opens one
    torch.testing.assert_close(out.boundaries[:, :first], seed_z[:, :first], rtol=TOL, atol=TOL)
    assert not torch.equal(out.boundaries, seed_z)
    assert max((out.hidden[k] - seed_steps(seed, "h", k)).abs().max().item() for k in range(L)) > 1e-3
