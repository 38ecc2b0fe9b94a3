"""The fast path's backward through time (backward_sequence): each layer step backwards in the plan's kernel
backend around one matmul (layer_step_backward), then the parameters' gradients in one reduction per layer over
all steps (parameter_gradients)."""

from __future__ import annotations

import torch
from torch import Tensor

from hmlm.fast import kernels
from hmlm.fast.kernels import LayerNormParams
from hmlm.fast.tape import LayerGrads, LayerTape, Plan


def backward_sequence(
    plan: Plan,
    Z: Tensor,
    tapes: list[LayerTape],
    weights: list[Tensor],
    ln: list[LayerNormParams] | None,
    grad_hidden: list[Tensor | None],  # L x (B, T, H_l) or None
    grad_boundaries: Tensor | None,  # (B, T, L-1) or None
    grad_h: list[Tensor | None],  # the final state's gradients, L x (B, H_l) or None
    grad_c: list[Tensor | None],
    grad_z: list[Tensor | None],
):
    """Backward through time. Returns the gradients of x_proj (T, B, R_1), h0, c0, z0, the weights, the biases
    and the layer norm parameters."""
    L = plan.num_layers
    T = Z.shape[0] - 1
    w = [weight.to(plan.mm_dtype) for weight in weights]  # (R, K), cast once per call
    grads = [LayerGrads(plan, tapes[i], i, Z, grad_h[i], grad_c[i], grad_z[i]) for i in range(L)]
    # The loss's gradients of each h_t, which cell_backward adds in (g_ext), as rows whose last dimension is
    # contiguous (as the kernels read them).
    ext_h = [g.unbind(1) if g is not None else None for g in grad_hidden]
    ext_h = [[g.contiguous() for g in gs] if gs is not None and gs[0].stride(-1) != 1 else gs for gs in ext_h]
    ext_z = grad_boundaries.unbind(1) if grad_boundaries is not None else None
    for t in reversed(range(T)):
        for layer in reversed(range(L)):
            grad = grads[layer]
            if ext_z is not None and layer < L - 1:
                grad.dz += ext_z[t][:, layer : layer + 1]
            below = (tapes[layer - 1], grads[layer - 1]) if layer > 0 else None
            above = (tapes[layer + 1], grads[layer + 1]) if layer < L - 1 else None
            layer_ln = ln[layer] if ln else None
            g_ext = ext_h[layer][t] if ext_h[layer] is not None else None
            layer_step_backward(plan, tapes[layer], grad, below, above, t, w[layer], layer_ln, g_ext)
    dh = [g.pair_h[g.cur] for g in grads]
    dc = [g.pair_c[g.cur] for g in grads]
    return grads[0].ds, dh, dc, [g.dz for g in grads], *parameter_gradients(plan, tapes, grads, weights, ln)


def layer_step_backward(
    plan: Plan, tape: LayerTape, grad: LayerGrads, below: tuple | None, above: tuple | None, t: int,
    w: Tensor, ln: LayerNormParams | None, g_ext: Tensor | None,
) -> None:  # fmt: skip
    """Step t of one layer, backwards: from the gradients w.r.t. h_t, c_t, z_t (grad's current pair and dz) to
    those of the step's inputs, and ds[t]. The plan's kernel backend does the cell's backward up to ds[t] (with
    the loss's gradient of h_t, g_ext, added in); then the matmul; then the backend routes dx to h_{t-1}, the
    layers around and the boundaries."""
    cur, nxt = grad.cur, 1 - grad.cur
    top, bottom = above is None, below is None
    backend = kernels.load(plan.kernels)
    backend.cell_backward(
        grad.pair_flat[cur], g_ext, grad.dz, tape.act_t[t], tape.tc_t[t], tape.c_t[t], tape.c_t[t + 1],
        tape.keep_f_t[t],
        None if bottom else tape.neg_d_copy_t[t], None if top else tape.zraw_t[t], None if top else tape.zhat_t[t],
        tape.gates_t[t] if ln else None, *tape.ln_stats_t[t], ln[0] if ln else None, ln[2] if ln else None,
        grad.ln_out_t[t], grad.z_prev_t[t], None if bottom else grad.z_below_t[t],
        grad.ds_t[t], grad.ds_mm, grad.pair_c[nxt], grad.dz_pair[nxt], None if bottom else grad.dz_below, plan.seed,
        plan.slope,
    )  # fmt: skip
    dx = torch.mm(grad.ds_t[t] if grad.ds_mm is None else grad.ds_mm, w)  # (B, K), in the matmul's dtype
    tape_above, grad_above = above or (None, None)
    tape_below, grad_below = below or (None, None)
    backend.route_backward(
        dx, tape.D, grad.pair_flat[cur], grad.z_prev_t[t], None if bottom else grad.z_below_t[t], grad.pair_flat[nxt],
        None if top else grad_above.pair_flat[grad_above.cur], None if top else tape_above.h_t[t],
        None if bottom else grad_below.pair_flat[grad_below.cur], None if bottom else tape_below.h_t[t + 1],
        grad.dz_pair[nxt], None if bottom else grad.dz_below, None if bottom else grad_below.dz,
    )  # fmt: skip
    grad.dz = grad.dz_pair[nxt]
    grad.swap()


def parameter_gradients(plan: Plan, tapes: list[LayerTape], grads: list[LayerGrads], weights, ln):
    """The weight, bias and layer norm gradients: one reduction over all B*T rows per layer."""
    grad_w, grad_b, grad_ln = [], [], []
    for layer, (tape, grad) in enumerate(zip(tapes, grads, strict=True)):
        T = grad.ds.shape[0]
        ds = grad.ds.flatten(0, 1)  # (T*B, R)
        x = tape.x[:T].flatten(0, 1)  # (T*B, K)
        grad_w.append(torch.mm(ds.t().to(plan.mm_dtype), x).to(weights[layer].dtype))  # (R, K)
        grad_b.append(ds.sum(0))
        if ln is not None and grad.ln_grad is not None:  # summed as the kernels went (C++)
            H = tape.H
            gain, bias, cell_gain, cell_bias = grad.ln_grad.split((4 * H, 4 * H, H, H))
            grad_ln.append((gain.view(4, H), bias.view(4, H), cell_gain, cell_bias))
        elif ln is not None:  # from the kernels' rows (see kernels.ln_grad_rows)
            mean, rstd = tape.gates_mean, tape.gates_rstd  # (T, B, 4, 1)
            normed = (tape.gates.view(*mean.shape[:3], -1) - mean) * rstd  # (T, B, 4, H)
            dact = grad.dact.view_as(normed)
            mean_c, rstd_c = tape.cell_mean, tape.cell_rstd  # (T, B, 1)
            normed_c = (tape.c[1:] - mean_c) * rstd_c
            d_cn = grad.d_cn
            grad_ln.append(
                ((dact * normed).sum((0, 1)), dact.sum((0, 1)), (d_cn * normed_c).sum((0, 1)), d_cn.sum((0, 1)))
            )
    return grad_w, grad_b, grad_ln
