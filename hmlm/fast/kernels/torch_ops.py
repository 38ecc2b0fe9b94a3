"""The "torch" backend: a layer step's elementwise work (and, backwards, the routing of the step's input
gradient) in plain torch ops, on any device and dtype. The fallback wherever a fused backend cannot serve, and
the readable one: cell_cpu.cpp and triton.py do the same arithmetic, explained in hmlm/fast/'s docstring.

Dispatch is what costs here (a few microseconds an op), so the blend is written in as few ops as fused kernels
allow (lerp, addcmul, sigmoid_backward), and results go with out= into the tape's buffers. These functions work
on hmlm/fast/'s tapes (LayerTape, LayerGrads) and the per-step views this path reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from hmlm.cell import hard_sigmoid
from hmlm.fast.kernels import LN_EPS, LayerNormParams

if TYPE_CHECKING:  # only for the annotations: fast.py imports this module, not the other way round
    from hmlm.fast import LayerGrads, LayerTape, Plan

aten = torch.ops.aten


def cell_step(
    plan: Plan, tape: LayerTape, below: LayerTape | None, above: LayerTape | None, t: int, k: int,
    ln: LayerNormParams | None, z_below: Tensor, ones: Tensor,
) -> None:  # fmt: skip
    """The elementwise part of layer_step in torch ops, from the gates' pre-activations to h_t, c_t and z_t."""
    H = tape.H
    h_prev, c_prev, z_prev = tape.h_t[t], tape.c_t[t], tape.z_t[t]  # (B, H), (B, H), (B, 1)
    gates = tape.gates_t[k]  # (B, 4H)

    # Gates: sigm(f), sigm(i), sigm(o), tanh(g); with layer norm on each of the four blocks on its own.
    if ln is not None:
        normed, mean, rstd = torch.native_layer_norm(gates.view(-1, 4, H), (H,), None, None, LN_EPS)
        if tape.save:
            tape.gates_mean_t[k].copy_(mean)
            tape.gates_rstd_t[k].copy_(rstd)
        gates = torch.addcmul(ln[1], normed, ln[0]).view(-1, 4 * H)
    torch.sigmoid(gates[:, : 3 * H], out=tape.fio_t[k])
    torch.tanh(gates[:, 3 * H :], out=tape.g_t[k])
    f, i, o, g = tape.f_t[k], tape.i_t[k], tape.o_t[k], tape.g_t[k]

    # c = keep*i*g + (copy + update*f)*c_prev
    ig = i * g
    keep_f, c = tape.keep_f_t[k], tape.c_t[t + 1]
    if below is None:  # layer 1: z_below = 1, so update = 1 - z_prev, copy = 0, keep = 1
        torch.addcmul(f, f, z_prev, value=-1, out=keep_f)
        torch.addcmul(ig, keep_f, c_prev, out=c)
    else:
        update = torch.addcmul(z_below, z_prev, z_below, value=-1)  # (1 - z_prev) z_below   (B, 1)
        keep = z_prev + update
        copy = torch.sub(ones, keep)
        torch.addcmul(copy, f, update, out=keep_f)
        torch.mul(ig, keep, out=c)
        c.addcmul_(keep_f, c_prev)

    # h = lerp(o*tanh(c), h_prev, copy)
    tc = tape.tc_t[k]
    if ln is not None:
        normed_c, mean_c, rstd_c = torch.native_layer_norm(c, (H,), ln[2], ln[3], LN_EPS)
        if tape.save:
            tape.cell_mean_t[k].copy_(mean_c)
            tape.cell_rstd_t[k].copy_(rstd_c)
        torch.tanh(normed_c, out=tc)
    else:
        torch.tanh(c, out=tc)
    h = tape.h_t[t + 1]
    if below is None:
        torch.mul(o, tc, out=h)
    else:
        otc = o * tc
        torch.lerp(otc, h_prev, copy, out=h)
        if tape.save:
            torch.sub(otc, h_prev, out=tape.neg_d_h_t[k])
            torch.sub(ig, c_prev, out=tape.neg_d_c_t[k])

    # The boundary: z = keep*zraw. It can only open on a step that computed something.
    if above is not None:
        zhat, zraw = tape.zhat_t[k], tape.zraw_t[k]  # (B, 1)
        if plan.mode == "soft":
            zraw.copy_(hard_sigmoid(zhat, plan.slope))
        elif not (plan.mode == "sample" and plan.training):  # (a sample was drawn by layer_step)
            torch.gt(zhat, 0, out=zraw)  # whatever the slope
        if below is None:
            tape.z_t[t + 1].copy_(zraw)
        else:
            torch.mul(keep, zraw, out=tape.z_t[t + 1])


def layer_step_backward(
    plan: Plan, tape: LayerTape, grad: LayerGrads, below: tuple | None, above: tuple | None, t: int,
    w: Tensor, ln: LayerNormParams | None,
) -> None:  # fmt: skip
    """Step t of one layer, backwards: from the gradients w.r.t. h_t, c_t, z_t (grad's current pair and dz)
    to those of the step's inputs, and ds[t]."""
    H, D = tape.H, tape.D
    cur, nxt = grad.cur, 1 - grad.cur
    g_h, g_c, g_z = grad.pair_h[cur], grad.pair_c[cur], grad.dz  # (B, H), (B, H), (B, 1)
    f, i, o, g = tape.f_t[t], tape.i_t[t], tape.o_t[t], tape.g_t[t]
    tc, c_prev = tape.tc_t[t], tape.c_t[t]
    keep, update, copy = grad.keep_t[t], grad.update_t[t], grad.copy_t[t]

    # h = lerp(o*tanh(cn), h_prev, copy)
    g_otc = g_h if below is None else g_h * keep
    torch.mul(g_otc, tc, out=grad.do_t[t])
    d_tc = aten.tanh_backward(g_otc * o, tc)
    if ln is not None:
        grad.d_cn_t[t].copy_(d_tc)
        mean_c, rstd_c = tape.cell_mean_t[t], tape.cell_rstd_t[t]
        mask = (True, False, False)
        g_c += aten.native_layer_norm_backward(d_tc, tape.c_t[t + 1], (H,), mean_c, rstd_c, ln[2], ln[3], mask)[0]
    else:
        g_c += d_tc
    # c = keep*i*g + (copy + update*f)*c_prev; g_c is now the whole d loss / d c_t.
    g_ig = g_c if below is None else g_c * keep
    torch.mul(g_ig, g, out=grad.di_t[t])
    torch.mul(g_ig, i, out=grad.dg_t[t])
    g_c_c_prev = g_c * c_prev
    torch.mul(g_c_c_prev, update, out=grad.df_t[t])
    g_update = (g_c_c_prev * f).sum(1, keepdim=True)  # (B, 1)
    torch.mul(g_c, tape.keep_f_t[t], out=grad.pair_c[nxt])  # d c_{t-1}

    # Through the nonlinearities (and the layer norm) into the gate pre-activations.
    aten.sigmoid_backward.grad_input(grad.dfio_t[t], tape.fio_t[t], grad_input=grad.dfio_t[t])
    aten.tanh_backward.grad_input(grad.dg_t[t], g, grad_input=grad.dg_t[t])
    if ln is not None:
        mean, rstd = tape.gates_mean_t[t], tape.gates_rstd_t[t]  # (B, 4, 1)
        d_normed = grad.dact[t].view(-1, 4, H) * ln[0]
        mask = (True, False, False)
        gates = tape.gates_t[t].view(-1, 4, H)
        d_gates = aten.native_layer_norm_backward(d_normed, gates, (H,), mean, rstd, None, None, mask)[0]
        grad.dgates_t[t].copy_(d_gates.view(-1, 4 * H))

    # Into the choice of operation (z_prev, z_below), and through z = keep*zraw into zhat (straight-through).
    if below is None:  # z_below = 1: d z_prev = -G_upd
        g_z_prev = -g_update
    else:
        neg_g_copy = (grad.pair_flat[cur] * tape.neg_d_copy_t[t]).sum(1, keepdim=True)  # <[dh|dc], -d[h|c]/d copy>
        if above is not None:
            neg_g_copy.addcmul_(g_z, tape.zraw_t[t])
        diff = g_update + neg_g_copy
        g_z_prev = torch.addcmul(neg_g_copy, grad.z_below_t[t], diff, value=-1)
        g_z_below = grad.not_flush_t[t] * diff
    if above is not None:
        torch.mul(g_z, grad.keep_st_t[t], out=grad.dzhat_t[t])

    # Through the matmul into the step's inputs [z_below h_below | h_prev | z_prev h_above].
    ds = grad.ds_t[t]
    dx = torch.mm(ds, w) if ds.dtype == w.dtype else torch.mm(ds.to(w.dtype), w).to(ds.dtype)  # (B, K)
    dh_prev = dx[:, D : D + H]
    if below is None:
        grad.pair_h[nxt].copy_(dh_prev)
    else:
        torch.addcmul(dh_prev, g_h, copy, out=grad.pair_h[nxt])  # recurrent, and COPY's pass-through
    if above is not None:
        tape_above, grad_above = above
        dx_above = dx[:, D + H :]
        grad_above.pair_h[grad_above.cur].addcmul_(dx_above, grad.z_prev_t[t])  # layer l+1 is at step t-1 already
        g_z_prev += (dx_above * tape_above.h_t[t]).sum(1, keepdim=True)
    grad.dz = g_z_prev
    if below is not None:
        tape_below, grad_below = below
        dx_below = dx[:, :D]
        grad_below.pair_h[grad_below.cur].addcmul_(dx_below, grad.z_below_t[t])
        grad_below.dz += g_z_below + (dx_below * tape_below.h_t[t + 1]).sum(1, keepdim=True)
    grad.swap()
