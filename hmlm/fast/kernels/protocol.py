"""What every backend of hmlm/fast/kernels/ implements (`FusedKernels`) and the constants they share. Here, not in
the package's __init__ (which chooses and loads the backends), so that a backend imports nothing that imports it."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64)  # the fused backends' (the state's dtype: fp32 under autocast too)
LN_EPS = 1e-5  # F.layer_norm's default, which the reference uses
LayerNormParams = tuple[Tensor, Tensor, Tensor, Tensor]  # gate gain (4, H), gate bias (4, H), cell gain, cell bias
ZRAW_MODES = {"step": 0, "soft": 1, "sample": 2}  # cell_forward's zraw_mode; sample: zraw drawn by the caller


class FusedKernels(Protocol):
    """What a backend implements. Every (B, width) tensor may be a row-strided view whose last dimension is
    contiguous; an absent optional tensor (None) means "this layer has none": no layer below (layer 1:
    z_below = 1), no layer above (the top layer: no boundary), no layer norm, nothing saved for the backward, or
    nothing to write for the next matmuls. Shapes: H this layer's width, D the one below's, A the one above's;
    z's and zhat are (B, 1). Every tensor is in the state's dtype, except those of the matmuls under autocast
    (addend, h_rec, h_up, h_down, ds_mm, dx: the matmuls' dtype, e.g. bf16), which the C++ backend never gets."""

    def cell_forward(
        self, gates: Tensor, zhat: Tensor | None, addend: Tensor | None, ln_gain: Tensor | None,
        ln_bias: Tensor | None, cell_gain: Tensor | None, cell_bias: Tensor | None, h_prev: Tensor, c_prev: Tensor,
        z_prev: Tensor, z_below: Tensor | None, act: Tensor, keep_f: Tensor, c: Tensor, tc: Tensor, h: Tensor,
        h_rec: Tensor | None, h_up: Tensor | None, h_down: Tensor | None, neg_dh: Tensor | None,
        neg_dc: Tensor | None, zraw: Tensor | None, z: Tensor | None, gates_mean: Tensor | None,
        gates_rstd: Tensor | None, cell_mean: Tensor | None, cell_rstd: Tensor | None, zraw_mode: int,
        seed: bool, slope: float | Tensor, eps: float,
    ) -> None:  # fmt: skip
        """From the pre-activations gates (B, 4H) and zhat to act (B, 4H: sigm f, i, o, tanh g), keep_f, c, tc
        (tanh of the normalized c), h, and z = keep*zraw, zraw as `zraw_mode` says (ZRAW_MODES: 1[zhat > 0],
        hard_sigmoid(zhat), or given in zraw); under `seed` (the seed's cell, hmlm/cell.py) z = zraw, COPY
        included. `addend`: the step's matmul product (B, 4H [+ 1]) in its own
        dtype, added into gates and zhat first (and kept there). Where given: h written again where the next
        matmuls read it, masked as they take it (h_rec = h, this layer's next input; h_up = z*h, the layer
        above's bottom-up input; h_down = z_below*h, the layer below's next top-down input); the saved terms
        neg_dh = o*tanh(c) - h_prev and neg_dc = i*g - c_prev; the layer norm statistics ((B, 4) and (B, 1)).
        `slope`: a number, or a 0-dim tensor on the device (the C++ backend takes a number)."""

    def cell_backward(
        self, pair: Tensor, g_ext: Tensor | None, g_z: Tensor, act: Tensor, tc: Tensor, c_prev: Tensor, c: Tensor,
        keep_f: Tensor, neg_d_copy: Tensor | None, zraw: Tensor | None, zhat: Tensor | None, gates: Tensor | None,
        gates_mean: Tensor | None, gates_rstd: Tensor | None, cell_mean: Tensor | None, cell_rstd: Tensor | None,
        ln_gain: Tensor | None, cell_gain: Tensor | None, ln_grad: Tensor | None, z_prev: Tensor,
        z_below: Tensor | None, ds: Tensor, ds_mm: Tensor | None, dc_prev: Tensor, gz_prev: Tensor,
        gz_below: Tensor | None, seed: bool, slope: float | Tensor,
    ) -> None:  # fmt: skip
        """From the gradients [dh | dc] (pair, (B, 2H)) and dz (g_z) of the step's outputs to ds (B, 4H [+ 1]) of
        its pre-activations (and again in the matmul's dtype, ds_mm, where given), dc_prev, and the gradients of
        z_prev (gz_prev) and z_below (gz_below). g_ext, where given, is the loss's own gradient of h_t: added into
        pair's dh, which keeps the sum (route_backward reads it); pair's dc is left as it is. neg_d_copy: the
        forward's [neg_dh | neg_dc]. ln_grad: see `ln_grad_rows`. Under `seed` no gradient goes through the
        choice of operation (gz_prev and gz_below are 0 here; route_backward adds the masks' shares) and dz
        reaches zhat on every step, COPY included (z = zraw)."""

    def route_backward(
        self, dx: Tensor, D: int, pair: Tensor, z_prev: Tensor, z_below: Tensor | None, pair_next: Tensor,
        above_pair: Tensor | None, h_above: Tensor | None, below_pair: Tensor | None, h_below: Tensor | None,
        gz_prev: Tensor, gz_below: Tensor | None, below_dz: Tensor | None,
    ) -> None:  # fmt: skip
        """The gradient dx (B, D + H + A) of the step's matmul input, routed: into dh_{t-1} (pair_next's first
        H columns, with COPY's pass-through of pair's dh), the layer above's dh (added) and this layer's gz_prev
        (added), the layer below's dh and dz (added: below_dz += gz_below + its share of dx)."""


def ln_grad_rows(backend: str) -> bool:
    """How a backend returns the layer norm parameters' gradients through cell_backward's `ln_grad`.
    C++ adds each step's to one (10H,) accumulator [gates gain 4H | gates bias 4H | cell gain H | cell bias H]
    as it goes (one thread per chunk of rows, under a lock). Triton, where rows run in parallel and atomic adds
    would make the sums' order (so their last bits) change from run to run, writes the step's rows
    [d gates after their layer norm 4H | d normalized c H] (B, 5H), and the sums are made after the loop; so do
    the torch ops, for which one reduction over all steps after the loop is also the cheaper."""
    return backend in ("triton", "torch")
