"""The HM-LSTM cell: hard sigmoid, straight-through boundary, and the readable reference step.

This file is the specification in code (docs/design.md, "The model"). It needs only torch. Faster paths live in
hmlm/fast/ (the model's HMLSTM, in hmlm/model/hmlstm.py, chooses which one runs) and are tested to give the same
numbers as `reference_step` in float64, forward and backward.

One step of layer l, in the paper's notation:

    s = U_rec h^l_{t-1} + z^l_{t-1} U_td h^{l+1}_{t-1} + z^{l-1}_t W h^{l-1}_t + b
    FLUSH  (z^l_{t-1} = 1):                 c = i*g                 h = o*tanh(c)
    UPDATE (z^l_{t-1} = 0, z^{l-1}_t = 1):  c = f*c_{t-1} + i*g     h = o*tanh(c)
    COPY   (z^l_{t-1} = 0, z^{l-1}_t = 0):  c = c_{t-1}             h = h_{t-1}

Two cells (`cell`, model.cell), which differ in the boundary of a COPY step and in one gradient:
    hmlm   z^l_t = 0 on a COPY: a boundary opens only on a step that computed something (the paper computes the
           gates "only when needed"); the straight-through gradient of z reaches the detector through the choice
           of operation as well as through the masks.
    seed   as the TensorFlow library hmlm grew from (lucaslingle/hm_lstm) and the paper's equations read
           literally: z^l_t = step(zhat) on every step, COPY included, where zhat = U_z h^l_{t-1} (the masked
           terms are 0 and the seed's detector has no bias), and the operation is chosen as by `tf.where`: no
           gradient through the choice, only through the masks of s.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

BOUNDARY_MODES = ("step", "sample", "soft")
CELLS = ("hmlm", "seed")  # docstring above


def hard_sigmoid(x: Tensor, slope: float | Tensor) -> Tensor:
    """clamp((slope * x + 1) / 2, 0, 1): the paper's hard sigmoid, whose slope the schedule anneals. The slope is a
    number or a 0-dim tensor (which a captured CUDA graph reads on the device)."""
    return ((slope * x + 1.0) / 2.0).clamp(0.0, 1.0)


def boundary(zhat: Tensor, slope: float | Tensor, mode: str = "step", training: bool = False) -> Tensor:
    """Turn the boundary detector's pre-activation into z, with the straight-through estimator.

    step:   z = 1[zhat > 0] forward (whatever the slope); the gradient is that of the hard sigmoid.
    sample: z ~ Bernoulli(hard_sigmoid) while training, straight-through; `step` otherwise.
    soft:   z = hard_sigmoid(zhat), no binarization.
    """
    z_soft = hard_sigmoid(zhat, slope)
    if mode == "soft":
        return z_soft
    if mode == "sample" and training:
        z_hard = torch.bernoulli(z_soft.detach())
    else:
        # zhat > 0 rather than z_soft > 0.5: the same for any slope > 0, and exact in every dtype.
        z_hard = (zhat > 0).to(zhat.dtype)
    # Straight-through: the forward value is exactly z_hard (x - x.detach() is exactly 0), the backward
    # is d z_soft / d zhat. Written without a branch on requires_grad so that it scripts and compiles.
    return z_hard + (z_soft - z_soft.detach())


class LayerWeights(NamedTuple):
    """The parameters of one HM-LSTM layer, as plain tensors, so the reference step is a pure function.

    rows = 4H + 1 (gates f, i, o, g and the boundary pre-activation zhat), or 4H for the top layer.
    """

    w_below: Tensor  # (rows, D_below)   bottom-up: applied to h^{l-1}_t, masked by z^{l-1}_t
    u_rec: Tensor  # (rows, H)           recurrent: applied to h^l_{t-1}, never masked
    u_above: Tensor | None  # (rows, H_above)   top-down: applied to h^{l+1}_{t-1}, masked by z^l_{t-1}
    bias: Tensor  # (rows,)
    ln_gates: tuple[Tensor, Tensor] | None  # LayerNorm gain and bias (4, H) of the gate blocks, or None
    ln_cell: tuple[Tensor, Tensor] | None  # LayerNorm gain and bias (H,) of c inside tanh(c), or None


def gate_layer_norm(gates: Tensor, ln: tuple[Tensor, Tensor]) -> Tensor:
    """Normalize each of the four gate blocks of s on its own: (B, 4H) -> (B, 4H)."""
    gain, bias = ln  # (4, H) each
    blocks = gates.unflatten(-1, (4, -1))  # (B, 4, H)
    return (F.layer_norm(blocks, blocks.shape[-1:]) * gain + bias).flatten(-2)


def cell_layer_norm(c: Tensor, ln: tuple[Tensor, Tensor] | None) -> Tensor:
    if ln is None:
        return c
    return F.layer_norm(c, c.shape[-1:], ln[0], ln[1])


def reference_step(
    weights: LayerWeights,
    h_below: Tensor,  # (B, D_below)  h^{l-1}_t (the embedding x_t for layer 1)
    z_below: Tensor,  # (B, 1)        z^{l-1}_t (ones for layer 1)
    h_prev: Tensor,  # (B, H)         h^l_{t-1}
    c_prev: Tensor,  # (B, H)         c^l_{t-1}
    z_prev: Tensor,  # (B, 1)         z^l_{t-1} (zeros for the top layer)
    h_above: Tensor | None,  # (B, H_above) h^{l+1}_{t-1}, None for the top layer
    slope: float | Tensor,
    mode: str = "step",
    training: bool = False,
    cell: str = "hmlm",
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of one layer, written as the equations read. Returns (h, c, z), z of shape (B, 1)."""
    s = preactivation(weights, h_below, z_below, h_prev, z_prev, h_above)
    h_top = h_above is None  # the top layer has no boundary detector and no top-down term
    return blend(
        s,
        h_prev,
        c_prev,
        z_prev,
        z_below,
        weights.ln_gates,
        weights.ln_cell,
        not h_top,
        slope,
        mode,
        training,
        cell,
    )


def preactivation(
    weights: LayerWeights, h_below: Tensor, z_below: Tensor, h_prev: Tensor, z_prev: Tensor, h_above: Tensor | None
) -> Tensor:
    """s of one step (B, rows): [f, i, o, g] pre-activations, then zhat (the boundary detector's) below the top."""
    s = h_prev @ weights.u_rec.T + z_below * (h_below @ weights.w_below.T) + weights.bias
    if h_above is not None:
        s = s + z_prev * (h_above @ weights.u_above.T)
    return s


def blend(
    s: Tensor,  # (B, rows) the summed pre-activations of the step
    h_prev: Tensor,  # (B, H)
    c_prev: Tensor,  # (B, H)
    z_prev: Tensor,  # (B, 1)
    z_below: Tensor,  # (B, 1)
    ln_gates: tuple[Tensor, Tensor] | None,
    ln_cell: tuple[Tensor, Tensor] | None,
    has_boundary: bool,
    slope: float | Tensor,
    mode: str = "step",
    training: bool = False,
    cell: str = "hmlm",
) -> tuple[Tensor, Tensor, Tensor]:
    """The elementwise part of a step: gates, the FLUSH / UPDATE / COPY blend, and the new boundary."""
    hidden = c_prev.shape[-1]
    gates, zhat = s[:, : 4 * hidden], s[:, 4 * hidden :]  # (B, 4H), (B, 1) or (B, 0) at the top
    if ln_gates is not None:
        gates = gate_layer_norm(gates, ln_gates)
    f, i, o, g = gates.chunk(4, dim=-1)
    f, i, o, g = torch.sigmoid(f), torch.sigmoid(i), torch.sigmoid(o), torch.tanh(g)

    # The three operations as one multiplicative blend (not a branch), so that the straight-through
    # gradient of z reaches the boundary detector through the choice of operation too; the seed chooses with
    # tf.where, which passes none: the same blend of detached boundaries.
    seed = cell == "seed"
    if seed:
        z_prev, z_below = z_prev.detach(), z_below.detach()
    flush = z_prev
    update = (1 - z_prev) * z_below
    copy = (1 - z_prev) * (1 - z_below)
    c = flush * (i * g) + update * (f * c_prev + i * g) + copy * c_prev
    h = copy * h_prev + (1 - copy) * o * torch.tanh(cell_layer_norm(c, ln_cell))

    if not has_boundary:  # the top layer: z^L = 0
        return h, c, torch.zeros_like(z_prev)
    if seed:  # the boundary of every step, COPY included
        return h, c, boundary(zhat, slope, mode, training)
    # A boundary can only open on a step where the layer computed something (not a COPY).
    return h, c, (1 - copy) * boundary(zhat, slope, mode, training)
