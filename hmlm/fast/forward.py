"""The fast path's forward: the stack run over a sequence (forward_sequence), one layer step at a time
(layer_step: the masked inputs, one matmul, then the step's elementwise work in the plan's kernel backend,
cell_step), and the step weights as the matmuls take them (on oneDNN for large layers without gradient)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hmlm.cell import hard_sigmoid
from hmlm.fast import kernels
from hmlm.fast.kernels import LN_EPS, ZRAW_MODES, LayerNormParams
from hmlm.fast.tape import LayerTape, Plan

LayerStep = Callable[..., None]  # layer_step's signature


def forward_sequence(
    plan: Plan,
    x_proj: Tensor,  # (T, B, R_1) layer 1's bottom-up pre-activations, bias included (time-major: each step's
    # slice is contiguous, as the matmul it is added to likes)
    h0: list[Tensor],  # L x (B, H_l)
    c0: list[Tensor],
    z0: list[Tensor],  # L x (B, 1)
    weights: list[Tensor],  # L x (R_l, K_l): [U_rec | U_above] for layer 1, [W_below | U_rec | U_above] above
    biases: list[Tensor | None],  # L x (R_l,); None for layer 1 (its bias is in x_proj)
    ln: list[LayerNormParams] | None,
    save: bool,
    tapes: list[LayerTape] | None = None,  # from an earlier call without save, or None for new ones
    step: LayerStep | None = None,  # what runs one layer step: layer_step, or one that skips (hmlm/fast/copy_skip.py)
) -> tuple[Tensor, list[LayerTape]]:
    """Run the stack over the sequence. Returns Z (T+1, B, L), every layer's z (row 0: the initial state), and
    the layers' tapes."""
    T, B, _ = x_proj.shape
    L = plan.num_layers
    device, dtype = h0[0].device, h0[0].dtype
    Z = torch.zeros(T + 1, B, L, device=device, dtype=dtype)
    tapes = tapes or [LayerTape(plan, layer, B, T, device, dtype, save) for layer in range(L)]
    for layer, tape in enumerate(tapes):
        tape.attach(Z)
        tape.h_t[0][:], tape.c_t[0][:], tape.z_t[0][:] = h0[layer], c0[layer], z0[layer]
    w_t = [step_weights(plan, w, B, T, save) for w in weights]
    # What each step's matmul adds to: layer 1's projected input at step t, the bias above it. With a slot per
    # step, the pre-activation buffers start out holding it, for all steps in one copy (addmm's out= would copy
    # it at every step, at several times the cost); with one slot, each step adds it.
    if save:
        for tape, base in zip(tapes, [x_proj, *biases[1:]], strict=True):
            tape.pre.copy_(base.expand_as(tape.pre))
        step_bases = [[None] * T] * L
    else:
        step_bases = [list(x_proj.unbind(0))] + [[bias] * T for bias in biases[1:]]
    # With the plain layer step, each step's kernels write the next steps' matmul inputs; the first step's come
    # from the initial state. (A step of another kind, copy_skip's, writes h where the kernels would not.)
    linked = step is None
    for layer, tape in enumerate(tapes):
        tape.linked = linked
        if linked and not tape.h_in_x:
            tape.x_rec_t[0].copy_(tape.h_t[0])
        if linked and not tape.top:
            torch.mul(tapes[layer + 1].h_t[0], tape.z_t[0], out=tape.x_above_t[0])
    ones = Z.new_ones(B, 1)  # z^0 = 1, the steps' last argument (copy_skip's step reads the batch size off it)
    step = step or layer_step
    for t in range(T):
        k = t if save else 0
        for layer, tape in enumerate(tapes):
            below = tapes[layer - 1] if layer > 0 else None
            above = tapes[layer + 1] if layer < L - 1 else None
            base = step_bases[layer][t]
            step(plan, tape, below, above, t, k, base, w_t[layer], ln[layer] if ln else None, ones)
    return Z, tapes


# Without gradient, a large layer's gates matmul runs on oneDNN, the library torch's own nn.LSTM runs on, instead
# of MKL (torch's matmul on the CPU). Measured on the 2-core AMD EPYC development machine, one thread: for a weight
# of K x N >= 1M (the PTB shape's 3 x 512: K 1024-1536, N 2048) oneDNN takes 0.56-0.91x MKL's time at 1-64 rows,
# the most at few rows (the gathered rows of hmlm/fast/copy_skip.py); at 3 x 256 (K x N 0.5-0.8M) about the same, and
# at small sizes its call costs ~15 us more. Its products differ from MKL's by rounding, so within one call a
# layer uses one engine at every step and for every row (gathered or not): skipping or not (HMLM_SKIP_COPY=0),
# evaluation gets the same gates. A single stream (B = 1: sampling, whose Stepper steps on MKL) stays on MKL, so
# that a prompt's call and the steps after it compute alike; training (a tape kept) stays on MKL.
ONEDNN_MIN_WEIGHT = 1_000_000


@dataclass(frozen=True)
class OneDNNWeight:
    """A layer's step weight (R, K), contiguous, for oneDNN: [gates | zhat] = base + x @ w.T."""

    w: Tensor


StepWeights = Tensor | OneDNNWeight  # a layer step's weight, as its matmul takes it (step_weights)


def uses_onednn(plan: Plan, B: int, K: int, N: int, save: bool) -> bool:
    """Whether a call's (B, K) x (K, N) step matmuls run on oneDNN (see ONEDNN_MIN_WEIGHT)."""
    usable = not save and B > 1 and plan.mm_dtype == torch.float32 and K * N >= ONEDNN_MIN_WEIGHT
    return usable and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled


def step_weights(plan: Plan, w: Tensor, B: int, T: int, save: bool) -> StepWeights:
    """A layer's per-step weight (R, K) as its step's matmul takes it, [gates | zhat] = x @ w_t: transposed, in the
    matmul's dtype (cast once per call, not per step), or for oneDNN."""
    if w.device.type == "cpu" and uses_onednn(plan, B, w.shape[1], w.shape[0], save):
        return OneDNNWeight(w.contiguous())
    w_t = w.to(plan.mm_dtype).t()
    # Over a long sequence it pays to make the transpose contiguous once (MKL's matmuls: ~3% at the PTB shape); for
    # a few steps (sampling) the copy would cost more than the steps.
    return w_t.contiguous() if T >= 16 else w_t


def matmul_add(base: Tensor | None, x: Tensor, w_t: Tensor | OneDNNWeight, out: Tensor) -> None:
    """out = base + x @ w_t, or out += x @ w_t without a base. Under autocast x and w_t are bf16: the product is
    added into fp32."""
    if isinstance(w_t, OneDNNWeight):
        product = torch.ops.mkldnn._linear_pointwise(x, w_t.w, None, "none", [], "")
        torch.add(out if base is None else base, product, out=out)
    elif x.dtype != out.dtype:
        torch.add(out if base is None else base, torch.mm(x, w_t), out=out)
    elif base is None:
        out.addmm_(x, w_t)
    else:
        torch.addmm(base, x, w_t, out=out)


def layer_step(
    plan: Plan, tape: LayerTape, below: LayerTape | None, above: LayerTape | None, t: int, k: int,
    base: Tensor | None, w_t: StepWeights, ln: LayerNormParams | None, ones: Tensor,
) -> None:  # fmt: skip
    """Step t of one layer (k: its slot in the tape): writes h_t, c_t and z_t."""
    h_prev, z_prev = tape.h_t[t], tape.z_t[t]  # (B, H), (B, 1)
    z_below = below.z_t[t + 1] if below is not None else None  # layer 1: z^0 = 1, which the kernels know

    # The masked inputs (unless the kernels of the steps before wrote them: tape.linked), then one matmul:
    # [gates | zhat] = base + x @ w_t  (B, R).
    x = tape.x_t[k]
    if not tape.linked:
        if below is not None:
            torch.mul(below.h_t[t + 1], z_below, out=tape.x_below_t[k])
        if above is not None:
            torch.mul(above.h_t[t], z_prev, out=tape.x_above_t[k])
        if not tape.h_in_x:
            tape.x_rec_t[k].copy_(h_prev)
    # Under autocast the kernel adds the product in (addend): no cast of its own. Not where a boundary is drawn
    # here first: the draw reads zhat with the product added.
    drawing = plan.mode == "sample" and plan.training and above is not None
    addend = None
    if tape.product is not None and base is None and not drawing:
        torch.mm(x, w_t, out=tape.product)  # in the matmul's dtype: the kernel adds it to the pre-activations
        addend = tape.product
    else:
        matmul_add(base, x, w_t, out=tape.pre_t[k])
    if drawing:
        torch.bernoulli(hard_sigmoid(tape.zhat_t[k], plan.slope), out=tape.zraw_t[k])  # the reference's draws

    cell_step(plan, tape, below, above, t, k, ln, z_below, addend)


def cell_step(
    plan: Plan, tape: LayerTape, below: LayerTape | None, above: LayerTape | None, t: int, k: int,
    ln: LayerNormParams | None, z_below: Tensor | None, addend: Tensor | None = None,
) -> None:  # fmt: skip
    """The elementwise part of layer_step, from the gates' pre-activations to h_t, c_t and z_t, in one call of the
    plan's kernel backend (kernels.FusedKernels.cell_forward). On a linked tape it also writes h_t where the next
    matmuls read it, masked as they take it: this layer's next input (h_rec, where h does not live in x), the
    layer above's bottom-up input z_t*h_t at this step (h_up), and the layer below's top-down input z_below*h_t at
    the next step (h_down; z_below here is that layer's z_t)."""
    top, bottom, save_copy = above is None, below is None, tape.save and below is not None
    zraw_mode = ZRAW_MODES["step" if plan.mode == "sample" and not plan.training else plan.mode]
    linked, k_next = tape.linked, k + 1 if tape.save else 0
    kernels.load(plan.kernels).cell_forward(
        tape.gates_t[k], None if top else tape.zhat_t[k], addend, *(ln or (None,) * 4),
        tape.h_t[t], tape.c_t[t], tape.z_t[t], z_below,
        tape.act_t[k], tape.keep_f_t[k], tape.c_t[t + 1], tape.tc_t[k], tape.h_t[t + 1],
        tape.x_rec_t[k_next] if linked and not tape.h_in_x else None,
        above.x_below_t[k] if linked and not top else None, below.x_above_t[k_next] if linked and not bottom else None,
        tape.neg_d_h_t[k] if save_copy else None, tape.neg_d_c_t[k] if save_copy else None,
        None if top else tape.zraw_t[k], None if top else tape.z_t[t + 1],
        *tape.ln_stats_t[k], zraw_mode, plan.seed, plan.slope, LN_EPS,
    )  # fmt: skip
