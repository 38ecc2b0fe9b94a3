"""The "torch" backend: a layer step's elementwise work, forward and backward, in plain torch ops, on any device
and dtype (float64 included). The fallback wherever a fused backend cannot serve, and the readable one: it
implements the same three functions as cpu.py (csrc/cell_cpu.cpp) and triton.py, with the same arguments
(hmlm.fast.kernels.FusedKernels), and the same arithmetic, explained in hmlm/fast/'s docstring.

Dispatch is what costs here (a few microseconds an op), so the blend is written in as few ops as torch allows
(lerp, addcmul, sigmoid_backward) and results go with out= straight into the buffers given. The layer norm
parameters' gradients come back as rows (`ln_grad_rows`: [d gates after their layer norm | d normalized c] per
step), summed after the loop as for Triton: that is what torch's own layer norm backward would give, in one sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hmlm.cell import hard_sigmoid
from hmlm.fast.kernels.protocol import ZRAW_MODES

aten = torch.ops.aten
SOFT, GIVEN = ZRAW_MODES["soft"], ZRAW_MODES["sample"]


def blend(z_prev: Tensor, z_below: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """update = (1 - z_prev) z_below, keep = z_prev + update (FLUSH or UPDATE), copy = 1 - keep; each (B, 1)."""
    update = torch.addcmul(z_below, z_prev, z_below, value=-1)
    keep = z_prev + update
    return update, keep, 1 - keep


def cell_forward(
    gates: Tensor, zhat: Tensor | None, addend: Tensor | None, ln_gain: Tensor | None, ln_bias: Tensor | None,
    cell_gain: Tensor | None, cell_bias: Tensor | None, h_prev: Tensor, c_prev: Tensor, z_prev: Tensor,
    z_below: Tensor | None, act: Tensor, keep_f: Tensor, c: Tensor, tc: Tensor, h: Tensor, h_rec: Tensor | None,
    h_up: Tensor | None, h_down: Tensor | None, neg_dh: Tensor | None, neg_dc: Tensor | None, zraw: Tensor | None,
    z: Tensor | None, gates_mean: Tensor | None, gates_rstd: Tensor | None, cell_mean: Tensor | None,
    cell_rstd: Tensor | None, zraw_mode: int, seed: bool, slope: float | Tensor, eps: float,
) -> None:  # fmt: skip
    """From the pre-activations [gates | zhat] to act, keep_f, c, tc, h and z (see FusedKernels.cell_forward)."""
    H = c.shape[1]
    bottom = z_below is None  # layer 1: z_below = 1, so update = 1 - z_prev, keep = 1, copy = 0

    # Under autocast the step's matmul product comes in its own dtype (bf16): added into the fp32
    # pre-activations, which are kept (the backward reads them under layer norm).
    if addend is not None:
        gates.add_(addend[:, : 4 * H])
        if zhat is not None:
            zhat.add_(addend[:, 4 * H :])

    # Gates: sigm(f), sigm(i), sigm(o), tanh(g); with layer norm on each of the four blocks on its own.
    if ln_gain is not None:
        normed, mean, rstd = torch.native_layer_norm(gates.view(-1, 4, H), (H,), None, None, eps)
        if gates_mean is not None:
            gates_mean.copy_(mean.view(-1, 4))
            gates_rstd.copy_(rstd.view(-1, 4))
        gates = torch.addcmul(ln_bias, normed, ln_gain).view(-1, 4 * H)
    torch.sigmoid(gates[:, : 3 * H], out=act[:, : 3 * H])
    torch.tanh(gates[:, 3 * H :], out=act[:, 3 * H :])
    f, i, o, g = act.split(H, dim=1)

    # c = keep*i*g + (copy + update*f)*c_prev: exactly c_prev on a COPY (keep = 0, copy = 1)
    ig = i * g
    if bottom:
        keep = None
        torch.addcmul(f, f, z_prev, value=-1, out=keep_f)
        torch.addcmul(ig, keep_f, c_prev, out=c)
    else:
        update, keep, copy = blend(z_prev, z_below)
        torch.addcmul(copy, f, update, out=keep_f)
        torch.mul(ig, keep, out=c)
        c.addcmul_(keep_f, c_prev)
        if neg_dc is not None:
            torch.sub(ig, c_prev, out=neg_dc)

    # h = lerp(o*tanh(c), h_prev, copy): exactly h_prev on a COPY (torch.lerp is exact at 0 and 1)
    if cell_gain is not None:
        normed_c, mean_c, rstd_c = torch.native_layer_norm(c, (H,), cell_gain, cell_bias, eps)
        if cell_mean is not None:
            cell_mean.copy_(mean_c)
            cell_rstd.copy_(rstd_c)
        torch.tanh(normed_c, out=tc)
    else:
        torch.tanh(c, out=tc)
    if bottom:
        torch.mul(o, tc, out=h)
    else:
        otc = o * tc
        torch.lerp(otc, h_prev, copy, out=h)
        if neg_dh is not None:
            torch.sub(otc, h_prev, out=neg_dh)

    # h where the next matmuls read it, in their dtype (out= casts): this layer's own next input (where h does not
    # live there), and the layer below's next top-down input z_below*h (this step's z_below is that layer's z_t).
    if h_rec is not None:
        h_rec.copy_(h)
    if h_down is not None:
        torch.mul(h, z_below, out=h_down)

    # The boundary: z = keep*zraw, zraw = 1[zhat > 0] (whatever the slope), hard_sigmoid(zhat), or drawn by the
    # caller. It can only open on a step that computed something; the seed's can open on a COPY too (z = zraw).
    if zraw is not None:
        if zraw_mode == SOFT:
            zraw.copy_(hard_sigmoid(zhat, slope))
        elif zraw_mode != GIVEN:
            torch.gt(zhat, 0, out=zraw)
        if bottom or seed:
            z.copy_(zraw)
        else:
            torch.mul(keep, zraw, out=z)
        if h_up is not None:  # the layer above's next bottom-up input, z*h
            torch.mul(h, z, out=h_up)


def cell_backward(
    pair: Tensor, g_ext: Tensor | None, g_z: Tensor, act: Tensor, tc: Tensor, c_prev: Tensor, c: Tensor,
    keep_f: Tensor, neg_d_copy: Tensor | None, zraw: Tensor | None, zhat: Tensor | None, gates: Tensor | None,
    gates_mean: Tensor | None, gates_rstd: Tensor | None, cell_mean: Tensor | None, cell_rstd: Tensor | None,
    ln_gain: Tensor | None, cell_gain: Tensor | None, ln_grad: Tensor | None, z_prev: Tensor, z_below: Tensor | None,
    ds: Tensor, ds_mm: Tensor | None, dc_prev: Tensor, gz_prev: Tensor, gz_below: Tensor | None,
    seed: bool, slope: float | Tensor,
) -> None:  # fmt: skip
    """From [dh | dc] (pair) and dz of the step's outputs to ds, dc_prev and the gradients of z_prev and z_below
    (see FusedKernels.cell_backward). ln_grad, with layer norm: this step's (B, 5H) rows [d gates after their layer
    norm | d normalized c], which parameter_gradients sums after the loop."""
    H = tc.shape[1]
    bottom = z_below is None
    f, i, o, g = act.split(H, dim=1)
    if g_ext is not None:  # the loss's own gradient of h_t, added and kept: route_backward reads the sum
        pair[:, :H].add_(g_ext)
    g_h, g_c = pair[:, :H], pair[:, H:]
    if bottom:
        keep, update = None, 1 - z_prev
    else:
        update, keep, _ = blend(z_prev, z_below)
    # Without layer norm the gradients after the activations are those of the pre-activations: straight into ds.
    d_act = ln_grad[:, : 4 * H] if ln_gain is not None else ds[:, : 4 * H]
    d_f, d_i, d_o, d_g = d_act.split(H, dim=1)

    # h = lerp(o*tanh(cn), h_prev, copy): into o, and into c through tanh (and the cell's layer norm).
    g_otc = g_h if bottom else g_h * keep
    torch.mul(g_otc, tc, out=d_o)
    d_cn = aten.tanh_backward(g_otc * o, tc)
    if cell_gain is not None:
        ln_grad[:, 4 * H :].copy_(d_cn)
        mask = (True, False, False)
        d_cn = aten.native_layer_norm_backward(d_cn, c, (H,), cell_mean, cell_rstd, cell_gain, None, mask)[0]
    g_c = g_c + d_cn  # the whole d loss / d c_t (pair's dc is left as it came, as the fused kernels leave it)

    # c = keep*i*g + (copy + update*f)*c_prev
    g_ig = g_c if bottom else g_c * keep
    torch.mul(g_ig, g, out=d_i)
    torch.mul(g_ig, i, out=d_g)
    g_c_c_prev = g_c * c_prev
    torch.mul(g_c_c_prev, update, out=d_f)
    g_update = (g_c_c_prev * f).sum(1, keepdim=True)  # d loss / d update, (B, 1)
    torch.mul(g_c, keep_f, out=dc_prev)

    # Through the nonlinearities (and the gates' layer norm) into the pre-activations.
    aten.sigmoid_backward.grad_input(d_act[:, : 3 * H], act[:, : 3 * H], grad_input=d_act[:, : 3 * H])
    aten.tanh_backward.grad_input(d_g, g, grad_input=d_g)
    if ln_gain is not None:
        d_normed = d_act.view(-1, 4, H) * ln_gain
        mean, rstd = gates_mean.unsqueeze(-1), gates_rstd.unsqueeze(-1)  # (B, 4, 1)
        mask = (True, False, False)
        d_gates = aten.native_layer_norm_backward(d_normed, gates.view(-1, 4, H), (H,), mean, rstd, None, None, mask)
        ds[:, : 4 * H].copy_(d_gates[0].view(-1, 4 * H))

    # Into the choice of operation (z_prev, z_below), through the two per-row scalars of hmlm/fast/'s docstring,
    # and through z = keep*zraw into zhat (straight-through). The seed's choice passes no gradient, and its z is zraw.
    if seed:
        gz_prev.zero_()
        if gz_below is not None:
            gz_below.zero_()
    elif bottom:  # z_below = 1: z does not depend on z_prev, and d z_prev = -G_upd
        torch.neg(g_update, out=gz_prev)
    else:
        # N_copy = <[dh | dc], -d[h | c]/d copy> + dz*zraw
        neg_g_copy = (g_h * neg_d_copy[:, :H]).sum(1, keepdim=True) + (g_c * neg_d_copy[:, H:]).sum(1, keepdim=True)
        if zraw is not None:
            neg_g_copy.addcmul_(g_z, zraw)
        diff = g_update + neg_g_copy
        torch.addcmul(neg_g_copy, z_below, diff, value=-1, out=gz_prev)
        torch.mul(1 - z_prev, diff, out=gz_below)
    if zraw is not None:
        # The hard sigmoid's derivative, as torch.clamp defines it (the bounds count as inside), times keep.
        y = (slope * zhat + 1.0) / 2.0
        st = ((y >= 0) & (y <= 1)).to(y.dtype) * (slope / 2.0)
        torch.mul(g_z if bottom or seed else g_z * keep, st, out=ds[:, 4 * H :])
    if ds_mm is not None:  # ds again, in the dtype of the matmul that takes it back to the step's inputs
        ds_mm.copy_(ds)


def route_backward(
    dx: Tensor, D: int, pair: Tensor, z_prev: Tensor, z_below: Tensor | None, pair_next: Tensor,
    above_pair: Tensor | None, h_above: Tensor | None, below_pair: Tensor | None, h_below: Tensor | None,
    gz_prev: Tensor, gz_below: Tensor | None, below_dz: Tensor | None,
) -> None:  # fmt: skip
    """The step's input gradient dx = d loss / d [z_below h_below | h_prev | z_prev h_above], routed (see
    FusedKernels.route_backward)."""
    H = pair_next.shape[1] // 2
    dx = dx.to(pair_next.dtype)  # in the matmul's dtype (bf16 under autocast); the sums are made in the state's
    # d h_{t-1}: the recurrent matmul, and COPY's pass-through.
    d_rec = dx[:, D : D + H]
    if z_below is None:
        pair_next[:, :H].copy_(d_rec)
    else:
        _, _, copy = blend(z_prev, z_below)
        torch.addcmul(d_rec, pair[:, :H], copy, out=pair_next[:, :H])
    if above_pair is not None:  # into layer l+1's h_{t-1} (masked by z_prev) and into z_prev
        d_above = dx[:, D + H :]
        above_pair[:, : d_above.shape[1]].addcmul_(d_above, z_prev)  # layer l+1 is at step t-1 already
        gz_prev += (d_above * h_above).sum(1, keepdim=True)
    if below_pair is not None:  # into layer l-1's h_t (masked by z_below) and its z_t
        d_below = dx[:, :D]
        below_pair[:, :D].addcmul_(d_below, z_below)
        below_dz += gz_below + (d_below * h_below).sum(1, keepdim=True)
