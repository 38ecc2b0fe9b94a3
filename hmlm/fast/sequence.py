"""The whole sequence as one autograd node (HMLSTMSequence), and the fast path's entry point (run), which keeps a
tape only when some gradient is needed."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from hmlm import devices
from hmlm.fast.backward import backward_sequence
from hmlm.fast.forward import LayerStep, forward_sequence
from hmlm.fast.kernels import LayerNormParams
from hmlm.fast.tape import TAPES, LayerTape, Plan


class HMLSTMSequence(torch.autograd.Function):
    """The whole sequence as one autograd node. Inputs: x_proj, then the flat list of `flatten_inputs`."""

    @staticmethod
    def forward(ctx, plan: Plan, x_proj: Tensor, *flat: Tensor):
        h0, c0, z0, weights, biases, ln = unflatten_inputs(plan, flat)
        with torch.autocast(x_proj.device.type, enabled=False):
            Z, tapes = forward_sequence(plan, x_proj, h0, c0, z0, weights, biases, ln, save=True)
        ctx.plan, ctx.Z, ctx.tapes = plan, Z, tapes
        ctx.save_for_backward(*weights, *[p for layer in ln or [] for p in layer])
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None and costs nothing
        return outputs(plan, Z, tapes)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor | None):
        if ctx.tapes is None:  # freed by the first backward, as autograd frees its own saved tensors
            raise RuntimeError(
                "Trying to backward through the HM-LSTM fast path a second time (retain_graph=True): its tape is "
                "freed after the first backward. Run the forward again, or use HMLSTM(impl='reference')."
            )
        plan, L = ctx.plan, ctx.plan.num_layers
        saved = ctx.saved_tensors
        weights = list(saved[:L])
        ln = [tuple(saved[L + 4 * layer : L + 4 * layer + 4]) for layer in range(L)] if plan.layer_norm else None
        grad_hidden, grad_boundaries = list(grads[:L]), grads[L]
        grad_h, grad_c = list(grads[L + 1 : 2 * L + 1]), list(grads[2 * L + 1 : 3 * L + 1])
        grad_z = [*grads[3 * L + 1 : 4 * L], None]  # the top layer's z is no output
        with torch.autocast(ctx.Z.device.type, enabled=False):
            d_x_proj, dh, dc, dz, grad_w, grad_b, grad_ln = backward_sequence(
                plan, ctx.Z, ctx.tapes, weights, ln, grad_hidden, grad_boundaries, grad_h, grad_c, grad_z
            )
        ctx.tapes = ctx.Z = None  # free the tape now, not when the graph goes
        grad_ln_flat = [g for layer in grad_ln for g in layer]
        return None, d_x_proj, *dh, *dc, *dz, *grad_w, *grad_b[1:], *grad_ln_flat


def flatten_inputs(h0, c0, z0, weights, biases, ln) -> list[Tensor]:
    return [*h0, *c0, *z0, *weights, *biases[1:], *[p for layer in ln or [] for p in layer]]


def unflatten_inputs(plan: Plan, flat):
    L = plan.num_layers
    h0, c0, z0 = list(flat[:L]), list(flat[L : 2 * L]), list(flat[2 * L : 3 * L])
    weights = list(flat[3 * L : 4 * L])
    biases = [None, *flat[4 * L : 5 * L - 1]]  # layer 1's bias is part of x_proj
    rest = flat[5 * L - 1 :]
    ln = [tuple(rest[4 * layer : 4 * layer + 4]) for layer in range(L)] if plan.layer_norm else None
    return h0, c0, z0, weights, biases, ln


def outputs(plan: Plan, Z: Tensor, tapes: list[LayerTape]) -> tuple[Tensor, ...]:
    """hidden (L x (B, T, H_l), views of the tape), boundaries (B, T, L-1), then the final h, c and z (the top
    layer's z left out: it is always 0). The final state is copied out, so that carrying it to the next call
    does not keep this call's buffers alive."""
    L = plan.num_layers
    hidden = [tape.h[1:].transpose(0, 1) for tape in tapes]
    boundaries = Z[1:, :, : L - 1].transpose(0, 1)
    h_last = [tape.h_t[-1].clone() for tape in tapes]
    c_last = [tape.c_t[-1].clone() for tape in tapes]
    z_last = [Z[-1, :, layer : layer + 1].clone() for layer in range(L - 1)]
    return (*hidden, boundaries, *h_last, *c_last, *z_last)


def run(
    plan: Plan,
    x_proj: Tensor,  # (T, B, R_1)
    h0: list[Tensor],
    c0: list[Tensor],
    z0: list[Tensor],
    weights: list[Tensor],
    biases: list[Tensor],
    ln: list[LayerNormParams] | None,
    step: LayerStep | None = None,  # without gradient: what runs a layer step (see forward_sequence)
) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """hidden, boundaries, and the final h, c, z. Keeps a tape only when some gradient is needed."""
    flat = flatten_inputs(h0, c0, z0, weights, biases, ln)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_proj, *flat)):
        out = HMLSTMSequence.apply(plan, x_proj, *flat)
    else:
        key = (plan, x_proj.shape[1], x_proj.device, h0[0].dtype)
        # While a CUDA graph is being captured (hmlm/training/cuda_graph.py), the tapes are the graph's own, from its
        # memory pool: a cached tape could be freed (and its memory reused) while the graph still writes into it.
        capturing = devices.capturing(x_proj)
        tapes = None if capturing else TAPES.take(key)
        autocast = torch.is_autocast_enabled(x_proj.device.type)  # entering a context costs more than a small step
        with torch.autocast(x_proj.device.type, enabled=False) if autocast else contextlib.nullcontext():
            Z, tapes = forward_sequence(
                plan, x_proj, h0, c0, z0, weights, biases, ln, save=False, tapes=tapes, step=step
            )
            out = outputs(plan, Z, tapes)
        if not capturing:
            TAPES.give(key, tapes)
    L = plan.num_layers
    hidden, boundaries = list(out[:L]), out[L]
    h, c, z = list(out[L + 1 : 2 * L + 1]), list(out[2 * L + 1 : 3 * L + 1]), list(out[3 * L + 1 :])
    return hidden, boundaries, h, c, [*z, torch.zeros_like(z0[-1])]
