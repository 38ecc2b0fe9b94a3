"""The HM-LSTM stack, the output module and the character language model.

Read top to bottom: the config, the recurrent state, the HMLSTM module (parameters, then its two
implementations: the step-by-step reference and the fast path), the output module, then CharLM.
Nothing here knows about files, datasets or training.

Initialization (chosen here; the paper does not say):
- every weight matrix of layer l is uniform in +-1/sqrt(H_l), as torch's nn.LSTM does, so HM-LSTM and the
  LSTM baseline start from the same scale;
- the forget-gate bias is 1, so an UPDATE keeps most of its memory early in training. With layer norm it is the
  f block's layer norm bias: a constant added to s before the gate layer norm is subtracted again with the
  block's mean, so the bias of s cannot hold it;
- the boundary detector's bias is 0, so at the start each layer closes a segment on about half of the steps:
  neither stuck closed (the layers above would never move and get no gradient) nor stuck open (no multiscale).

`cell: seed` (hmlm/cell.py) is the seed's cell, lucaslingle/hm_lstm, parameters and initialization included:
- no boundary-detector bias (the zhat row of s has none: the fast path and the reference add a constant 0);
- the seed's forget bias is a fixed +1 inside the sigmoid plus a trainable bias from 0: the same function, and
  the same gradient, as hmlm's trainable bias from 1, which is what is kept (so the layer-norm case is as hmlm's);
- the gates' matrix [W_below | U_rec | U_above] orthogonal (tf.orthogonal_initializer, gain 1), drawn as the
  seed draws it: the seed's top layer has a top-down block too (its input is zeros), so the top layer's matrix
  is drawn with it and the block dropped; the detector's row Glorot-uniform (fan in: those same columns);
- the output module's gates without bias, its two matrices Glorot-uniform (hmlm/model/charlm.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlm import fast
from hmlm.cell import BOUNDARY_MODES, CELLS, LayerWeights, blend, preactivation
from hmlm.fast import copy_skip, kernels

MODEL_KINDS = ("hmlstm", "lstm")
IMPLS = ("fast", "reference")  # the same function: hmlm/fast/, or the readable step of cell.py


@dataclass
class ModelConfig:
    kind: str = "hmlstm"  # "hmlstm", or "lstm" for torch's nn.LSTM as the baseline
    embed_dim: int = 128
    hidden_sizes: list[int] = field(default_factory=lambda: [512, 512, 512])
    output_embed_dim: int = 512
    layer_norm: bool = True
    boundary: str = "step"  # "step", "sample" or "soft" (paper, Table 1)
    boundary_bias: float = 0.0  # initial bias of every boundary detector's zhat; < 0 starts the layers firing less
    cell: str = "hmlm"  # "hmlm", or "seed": the cell of lucaslingle/hm_lstm (hmlm/cell.py)

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot build a model."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, not {self.kind!r}")
        if self.boundary not in BOUNDARY_MODES:
            raise ValueError(f"model.boundary must be one of {', '.join(BOUNDARY_MODES)}, not {self.boundary!r}")
        if self.cell not in CELLS:
            raise ValueError(f"model.cell must be one of {', '.join(CELLS)}, not {self.cell!r}")
        if self.kind == "lstm" and self.cell != "hmlm":
            raise ValueError(f"model.cell must be hmlm for kind: lstm ({', '.join(CELLS)} are HM-LSTM cells), not "
                             f"{self.cell!r}")  # fmt: skip
        if self.cell == "seed" and self.boundary_bias != 0:
            raise ValueError("model.boundary_bias must be 0 with model.cell: seed (the seed's detector has no bias)")
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ValueError(f"model.hidden_sizes must be a non-empty list of positive sizes, not {self.hidden_sizes}")
        if self.kind == "lstm" and len(set(self.hidden_sizes)) != 1:
            raise ValueError("model.hidden_sizes must all be equal for kind: lstm (torch's nn.LSTM has one width)")
        for name in ("embed_dim", "output_embed_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, not {getattr(self, name)}")


class HMLSTMState(NamedTuple):
    """The recurrent state of every layer; carry it from one call to the next to continue a sequence."""

    h: list[Tensor]  # L tensors (B, H_l)
    c: list[Tensor]  # L tensors (B, H_l)
    z: list[Tensor]  # L tensors (B, 1); the top layer's is always 0

    def detach(self) -> HMLSTMState:
        """The same values cut from the graph: the truncation point of truncated BPTT."""
        return HMLSTMState(*([t.detach() for t in part] for part in self))


class HMLSTMOutput(NamedTuple):
    hidden: list[Tensor]  # L tensors (B, T, H_l): every layer's h at every step
    boundaries: Tensor  # (B, T, L-1): z^1 .. z^{L-1} at every step
    state: HMLSTMState
    zhat: Tensor | None = None  # (B, T, L-1) the boundary detectors' pre-activations, when asked for (with_zhat)


class HMLSTM(nn.Module):
    """A stack of HM-LSTM layers over an input sequence, with the boundaries exposed.

    `impl` picks the implementation: "fast" (the default) or "reference", the readable step of cell.py.
    Both compute the same function and share the same parameters.
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: list[int],
        layer_norm: bool = False,
        boundary: str = "step",
        impl: str = "fast",
        boundary_bias: float = 0.0,
        cell: str = "hmlm",
    ):
        super().__init__()
        if boundary not in BOUNDARY_MODES:
            raise ValueError(f"boundary must be one of {BOUNDARY_MODES}, not {boundary!r}")
        if cell not in CELLS or (cell == "seed" and boundary_bias != 0):
            raise ValueError(f"cell must be one of {CELLS}, not {cell!r}, and the seed's has no boundary_bias")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, not {impl!r}")
        self.input_size = input_size
        self.hidden_sizes = list(hidden_sizes)
        self.layer_norm = layer_norm
        self.boundary_mode = boundary
        self.impl = impl
        self.cell = cell
        n = len(self.hidden_sizes)
        self.below_sizes = [input_size] + self.hidden_sizes[:-1]
        self.above_sizes = self.hidden_sizes[1:] + [0]  # the top layer has no top-down input
        # One matrix per layer, [W_below | U_rec | U_above] side by side (rows: f, i, o, g, then zhat below the
        # top), so that a step is one matmul over the concatenated inputs; layer_weights() gives the three parts.
        self.weight, self.bias = nn.ParameterList(), nn.ParameterList()
        self.ln_gates_gain, self.ln_gates_bias = nn.ParameterList(), nn.ParameterList()
        self.ln_cell_gain, self.ln_cell_bias = nn.ParameterList(), nn.ParameterList()
        for layer, (hidden, below, above) in enumerate(
            zip(self.hidden_sizes, self.below_sizes, self.above_sizes, strict=True)
        ):
            rows = 4 * hidden + (0 if layer == n - 1 else 1)
            self.weight.append(nn.Parameter(initial_weight(cell, rows, hidden, below, above)))
            bias = torch.zeros(4 * hidden if cell == "seed" else rows)  # the seed's zhat has no bias
            if not layer_norm:
                bias[:hidden] = 1.0  # forget gate
            bias[4 * hidden :] = boundary_bias  # zhat, below the top (never layer-normalized)
            self.bias.append(nn.Parameter(bias))
            if layer_norm:
                # The forget gate's 1 goes after the normalization (block 0 of the gates is f, in cell.py, hmlm/fast/
                # and cell_cpu.cpp alike): added to s before it, the block's mean would take it away again.
                ln_bias = torch.zeros(4, hidden)
                ln_bias[0] = 1.0
                self.ln_gates_gain.append(nn.Parameter(torch.ones(4, hidden)))
                self.ln_gates_bias.append(nn.Parameter(ln_bias))
                self.ln_cell_gain.append(nn.Parameter(torch.ones(hidden)))
                self.ln_cell_bias.append(nn.Parameter(torch.zeros(hidden)))

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    def layer_weights(self, layer: int) -> LayerWeights:
        """The parameters of one layer as the reference step takes them (views, so gradients reach them)."""
        D, H = self.below_sizes[layer], self.hidden_sizes[layer]
        weight = self.weight[layer]
        return LayerWeights(
            w_below=weight[:, :D],
            u_rec=weight[:, D : D + H],
            u_above=weight[:, D + H :] if layer < self.num_layers - 1 else None,
            bias=self.full_bias(self.bias[layer], layer),
            ln_gates=(self.ln_gates_gain[layer], self.ln_gates_bias[layer]) if self.layer_norm else None,
            ln_cell=(self.ln_cell_gain[layer], self.ln_cell_bias[layer]) if self.layer_norm else None,
        )

    def full_bias(self, bias: Tensor, layer: int) -> Tensor:
        """A layer's bias of s (rows,): the seed's, which has no zhat entry, with a constant 0 there."""
        if self.cell == "seed" and layer < self.num_layers - 1:
            return F.pad(bias, (0, 1))
        return bias

    def initial_state(self, batch_size: int, device=None, dtype=None) -> HMLSTMState:
        """All zeros: no memory, and no layer has just closed a segment."""
        like = self.weight[0]
        device, dtype = device or like.device, dtype or like.dtype

        def zeros(size: int) -> list[Tensor]:
            return [torch.zeros(batch_size, size, device=device, dtype=dtype)]

        return HMLSTMState(
            h=[t for hs in self.hidden_sizes for t in zeros(hs)],
            c=[t for hs in self.hidden_sizes for t in zeros(hs)],
            z=[t for _ in self.hidden_sizes for t in zeros(1)],
        )

    def forward(
        self, x: Tensor, state: HMLSTMState | None = None, slope: float | Tensor = 1.0, with_zhat: bool = False,
        projected: Tensor | None = None,
    ) -> HMLSTMOutput:  # fmt: skip
        """x: (B, T, input_size). Returns every layer's h, the boundaries and the final state; with `with_zhat`
        also the boundary detectors' pre-activations zhat (for a loss on the soft boundaries, hmlm/model/prior.py).
        `slope` is a number or a 0-dim tensor (read on the device, without a host synchronization). `projected`:
        layer 1's input projection of x, (T, B, 4 H_1 + 1), where the caller has it (CharLM's table of every
        symbol's, hmlm/fast/copy_skip.py); the fast path then skips that matmul."""
        if self.impl not in IMPLS:  # impl is a plain attribute: switching it is how tests compare the two
            raise ValueError(f"impl must be one of {IMPLS}, not {self.impl!r}")
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        if self.impl == "reference":
            return self._forward_reference(x, state, slope, with_zhat)
        out = self._forward_fast(x, state, slope, projected)
        return out._replace(zhat=boundary_preactivations(self, x, state, out)) if with_zhat else out

    def _forward_reference(self, x: Tensor, state: HMLSTMState, slope: float | Tensor, with_zhat: bool) -> HMLSTMOutput:
        n = self.num_layers
        weights = [self.layer_weights(layer) for layer in range(n)]
        h, c, z = list(state.h), list(state.c), list(state.z)
        ones = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype)  # z^0 = 1
        hidden: list[list[Tensor]] = [[] for _ in range(n)]
        boundaries: list[Tensor] = []
        zhats: list[Tensor] = []
        for x_t in x.unbind(1):  # unbind, not x[:, t]: its backward stacks once instead of T full-size adds
            h_below, z_below = x_t, ones
            h_above_prev = h[1:] + [None]  # h^{l+1}_{t-1}: read before any layer of step t overwrites it
            zhat_t = []
            for layer in range(n):
                # cell.reference_step, in its two parts, so that zhat can be kept
                s = preactivation(weights[layer], h_below, z_below, h[layer], z[layer], h_above_prev[layer])
                h[layer], c[layer], z[layer] = blend(
                    s, h[layer], c[layer], z[layer], z_below, weights[layer].ln_gates, weights[layer].ln_cell,
                    layer < n - 1, slope, self.boundary_mode, self.training, self.cell,
                )  # fmt: skip
                zhat_t.append(s[:, 4 * self.hidden_sizes[layer] :])  # (B, 1), or (B, 0) at the top
                h_below, z_below = h[layer], z[layer]
                hidden[layer].append(h[layer])
            boundaries.append(torch.cat(z[:-1], dim=-1) if n > 1 else x.new_zeros(x.shape[0], 0))
            zhats.append(torch.cat(zhat_t, dim=-1))
        return HMLSTMOutput(
            hidden=[torch.stack(hs, dim=1) for hs in hidden],  # L x (B, T, H_l)
            boundaries=torch.stack(boundaries, dim=1),  # (B, T, L-1)
            state=HMLSTMState(h, c, z),
            zhat=torch.stack(zhats, dim=1) if with_zhat else None,  # (B, T, L-1)
        )

    def _forward_fast(
        self, x: Tensor, state: HMLSTMState, slope: float | Tensor, projected: Tensor | None = None
    ) -> HMLSTMOutput:
        """The same function as the reference, arranged for speed: see hmlm/fast/. Without gradients a layer
        that copies skips its work where that pays (hmlm/fast/copy_skip.py)."""
        plan = self.fast_plan(x.device, state.h[0].dtype, slope)
        w_in, b_in, weights, bias, ln = self.fast_parameters()
        x_proj = F.linear(x.transpose(0, 1), w_in, b_in) if projected is None else projected  # (T, B, R_1)
        with copy_skip.skipping(plan, x.device, x.shape[0], state.h[0].dtype) as step:
            hidden, boundaries, h, c, z = fast.run(plan, x_proj, state.h, state.c, state.z, weights, bias, ln, step)
        return HMLSTMOutput(hidden, boundaries, HMLSTMState(h, c, z))

    def fast_plan(self, device: torch.device, dtype: torch.dtype, slope: float | Tensor = 1.0) -> fast.Plan:
        """What a call of the fast path on this device, with a state of this dtype, computes (hmlm/fast/)."""
        autocast = torch.is_autocast_enabled(device.type)
        mm_dtype = torch.get_autocast_dtype(device.type) if autocast else dtype
        backend = kernels.select(device, dtype, mm_dtype)
        # A tensor slope (the CUDA graph step's) stays a tensor: float() of a CUDA tensor would wait for the device,
        # and the Triton kernels read it through a pointer. The C++ kernels take a number; reading a CPU one is free.
        if backend == "cpu" or not isinstance(slope, Tensor):
            slope = float(slope)
        return fast.Plan(
            hidden_sizes=tuple(self.hidden_sizes),
            below_sizes=(0, *self.below_sizes[1:]),  # layer 1's input is projected before the loop
            layer_norm=self.layer_norm,
            mode=self.boundary_mode,
            training=self.training,
            slope=slope,
            mm_dtype=mm_dtype,
            kernels=backend,
            cell=self.cell,
        )

    def fast_parameters(self) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor], list | None]:
        """The parameters as the fast path takes them: layer 1's input projection (weight, bias), every layer's
        per-step weight ([U_rec | U_above] for layer 1), the biases, and the layer norms' (or None)."""
        weight = params(self.weight)
        bias = [self.full_bias(b, layer) for layer, b in enumerate(params(self.bias))]
        E = self.input_size
        weights = [weight[0][:, E:], *weight[1:]]  # the per-step parts
        ln = None
        if self.layer_norm:
            parts = (self.ln_gates_gain, self.ln_gates_bias, self.ln_cell_gain, self.ln_cell_bias)
            ln = list(zip(*map(params, parts), strict=True))
        return weight[0][:, :E], bias[0], weights, bias, ln


def boundary_preactivations(rnn: HMLSTM, x: Tensor, state: HMLSTMState, out: HMLSTMOutput) -> Tensor:
    """zhat (B, T, L-1) of a forward pass, computed again from its inputs and outputs: zhat^l_t is one row of
    s, a linear function of h^{l-1}_t z^{l-1}_t, h^l_{t-1} and z^l_{t-1} h^{l+1}_{t-1}, all of which the
    pass returns (state: the one it started from). Its gradient reaches the parameters and the layers through
    those outputs, exactly as the cell's own zhat does (tests/test_prior.py checks it against the reference).
    A few matrix-vector products per layer: the fast path need not keep zhat for it."""
    n = rnn.num_layers
    inputs = [x, *out.hidden]  # h^0 = x, h^1 .. h^L
    zhats = []
    for layer in range(n - 1):
        D, H = rnn.below_sizes[layer], rnn.hidden_sizes[layer]
        row, bias = rnn.weight[layer][4 * H], rnn.full_bias(rnn.bias[layer], layer)[4 * H]  # (D + H + A,), ()
        h_prev = torch.cat([state.h[layer][:, None], out.hidden[layer][:, :-1]], dim=1)  # (B, T, H)
        h_above_prev = torch.cat([state.h[layer + 1][:, None], out.hidden[layer + 1][:, :-1]], dim=1)
        z_prev = torch.cat([state.z[layer][:, None], out.boundaries[:, :-1, layer : layer + 1]], dim=1)
        below = inputs[layer] @ row[:D]  # (B, T)
        if layer > 0:
            below = below * out.boundaries[..., layer - 1]
        zhat = below + h_prev @ row[D : D + H] + z_prev[..., 0] * (h_above_prev @ row[D + H :]) + bias
        zhats.append(zhat)
    return torch.stack(zhats, dim=-1) if zhats else x.new_zeros(*x.shape[:2], 0)  # (B, T, L-1)


def initial_weight(cell: str, rows: int, hidden: int, below: int, above: int) -> Tensor:
    """A layer's [W_below | U_rec | U_above] (rows, below + hidden + above) as the module docstring says: uniform in
    +-1/sqrt(H), or for the seed's cell the gates' 4H rows orthogonal and the detector's row Glorot-uniform."""
    if cell != "seed":
        bound = 1.0 / math.sqrt(hidden)
        return torch.empty(rows, below + hidden + above).uniform_(-bound, bound)
    seed_above = above or hidden  # the seed's top layer has a top-down block of its own width (zeros in, dropped)
    columns = below + hidden + seed_above
    gates = nn.init.orthogonal_(torch.empty(4 * hidden, columns))[:, : below + hidden + above]
    if rows == 4 * hidden:
        return gates.contiguous()
    limit = math.sqrt(6.0 / (columns + 1))
    return torch.cat([gates, torch.empty(1, columns).uniform_(-limit, limit)])


def params(plist: nn.ParameterList) -> list[nn.Parameter]:
    """The parameters of a ParameterList, in order. Iterating the list itself costs microseconds per item, which
    adds up when sampling steps one symbol at a time."""
    return list(plist._parameters.values())
