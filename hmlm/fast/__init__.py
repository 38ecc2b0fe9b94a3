"""The fast path of the HM-LSTM stack: the function of `cell.reference_step`, run over a whole sequence with a
hand-written backward through time. `tests/test_model.py` holds it to the reference in float64.

Where the time goes, and what this file does about it (measure with `hmlm bench`):
- Autograd. Stepping the reference cell makes ~30 autograd nodes per layer and step. Here the whole sequence is
  one node (`HMLSTMSequence`), and forward and backward are plain tensor ops.
- Small ops. What is left of a step is elementwise work on (B, H) tensors, done by one of the backends of
  hmlm/fast/kernels/ (`Plan.kernels`, chosen by hmlm.fast.kernels.select): a fused one, C++ on the CPU or Triton on
  CUDA, in one call per layer and step forward (`fused_cell_step`) and two backward
  (`fused_layer_step_backward`); or a few dozen torch ops (hmlm/fast/kernels/torch_ops.py: `cell_step`,
  `layer_step_backward`), each paying microseconds of dispatch. Every way, results go into buffers allocated
  once per call, the per-step views of those buffers are made once per call, and h_t is written straight into
  the slot of the next step's matmul input.
- Matmuls. One per layer and step, [gates | zhat] from the concatenated masked inputs [z^{l-1}_t h^{l-1}_t |
  h^l_{t-1} | z^l_{t-1} h^{l+1}_{t-1}] against the layer's weight [W_below | U_rec | U_above] (masking the
  inputs rather than the products gives the same numbers: z is one scalar per row), and one backward. Layer 1's
  input projection is one matmul over all steps, made by the caller. The weight gradients are one matmul per
  layer over all B*T rows after the loop, instead of T thin ones accumulated into a large matrix; the layer norm
  gains likewise.
- Launches. On a GPU each of those calls is a kernel launch, and a step's launches cost more than its work at
  the paper's shapes, so the fused kernels also do what would be calls of their own: a layer step's kernel writes
  its h, masked, into the next matmul inputs of its own layer and of the layers above and below (`linked` tapes);
  the backward's kernel adds the loss's gradient of h in; under autocast the kernels take the matmul's bf16
  product and write ds again in bf16, so no cast runs per step, and the weights are cast once per call. That is
  3 matmuls and 3 kernels per step forward and 3 + 3 + 3 backward at 3 layers (hmlm/bench/launches.py counts them;
  `hmlm bench --launches`).
- Evaluation and sampling (no gradient needed) keep nothing but the outputs, and reuse their scratch buffers
  from one call to the next. On the CPU a large layer's gates matmul then runs on oneDNN (ONEDNN_MIN_WEIGHT),
  and hmlm/fast/copy_skip.py skips the steps that COPY.
What that buys is in docs/performance.md (`hmlm bench`). In short, on a 2-core CPU: at small widths
(3x128), where dispatch dominated, training runs ~2.4x the reference on one thread and ~3x on two; at the
paper's PTB width (3x512) matmuls are ~80% of a step, most of them of 64 rows at the BLAS's speed for that,
and leave the fast path at about half of nn.LSTM's speed for ~1.5x its arithmetic.

The blend of cell.blend, rearranged with the same values. With copy = (1 - z_prev)(1 - z_below),
update = (1 - z_prev) z_below and keep = 1 - copy (= flush + update):
    c = keep*i*g + (copy + update*f)*c_prev        exactly c_prev on a COPY (0*x + 1*c_prev)
    h = lerp(o*tanh(c), h_prev, copy)              exactly h_prev on a COPY (torch.lerp is exact at 0 and 1)
    z = keep*zraw                                  zraw = 1[zhat > 0], a Bernoulli draw, or hard_sigmoid(zhat)
In the backward everything that reaches z_prev and z_below goes through two per-row scalars, kept negated:
    N_copy = -d loss / d copy = <dh, o*tanh(c) - h_prev> + <dc, i*g - c_prev> + dz*zraw
    G_upd  =  d loss / d update = <dc, f*c_prev>
    d z_prev  = N_copy - z_below (G_upd + N_copy)          d z_below = (1 - z_prev)(G_upd + N_copy)
Layer 1 (z_below = 1) never copies and skips the copy terms.

Device-agnostic (CPU and CUDA): no backend synchronizes with the host inside the loops. Under autocast the
matmuls run in the autocast dtype (bf16) and add their products into fp32 pre-activation buffers: everything
elementwise (so every backend's kernels), and the carried state, stay in fp32.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from hmlm import devices
from hmlm.cell import hard_sigmoid
from hmlm.fast import kernels
from hmlm.fast.kernels import LN_EPS, ZRAW_MODES, LayerNormParams, torch_ops

# The torch-op backend's per-step functions, under the names the loops below call them by.
cell_step = torch_ops.cell_step
layer_step_backward = torch_ops.layer_step_backward
LayerStep = Callable[..., None]  # layer_step's signature


@dataclass(frozen=True)
class Plan:
    """What one call computes, apart from the tensors."""

    hidden_sizes: tuple[int, ...]
    below_sizes: tuple[int, ...]  # step-weight columns fed from below: 0 for layer 1 (projected before the loop)
    layer_norm: bool
    mode: str  # "step", "sample" or "soft"
    training: bool
    slope: float | Tensor  # a number, or a 0-dim tensor on the device (CUDA graphs); a number for the C++ kernels
    mm_dtype: torch.dtype  # the matmuls' dtype: the autocast dtype under autocast, else the state's
    kernels: str = "torch"  # the backend of each step's elementwise work: "torch", "cpu" or "triton" (hmlm/kernels)

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    @property
    def fused(self) -> bool:
        """Whether a fused backend (C++ or Triton) does the elementwise work, through the same three calls."""
        return self.kernels != "torch"


class LayerTape:
    """One layer's buffers for one call, and their per-step views (made once: a view costs a microsecond or two).

    With `save` every step has its own slot, kept for the backward. Without, one slot is reused (two for c), and
    the tape can serve the next call of the same plan and batch size (see TapeCache); only the outputs, h and z,
    are then new at every call (`attach`).
    """

    def __init__(self, plan: Plan, layer: int, B: int, T: int, device: torch.device, dtype: torch.dtype, save: bool):
        H, D = plan.hidden_sizes[layer], plan.below_sizes[layer]
        L = plan.num_layers
        A = plan.hidden_sizes[layer + 1] if layer < L - 1 else 0  # top-down input width
        S = T if save else 1
        like = {"device": device, "dtype": dtype}
        self.H, self.D, self.layer = H, D, layer
        self.bottom, self.top = layer == 0, layer == L - 1  # the top layer has no boundary and no top-down input
        self.save = save
        # Whether the fused kernels of this and the neighbouring layers write this layer's next matmul input
        # (h_rec, h_up, h_down: see fused_cell_step) instead of layer_step's own masking (set per call).
        self.linked = False

        # The matmul inputs [z_below h_below | h_prev | z_prev h_above] of every step (B, D + H + A), slot t for
        # step t (slot T: h_{T-1}), or one slot reused. h_t is written straight into the h_prev part of slot t + 1,
        # unless the matmuls run in another dtype (autocast) or only one slot is kept; then h has its own buffer
        # and the fused kernels write it into x as well (h_rec).
        self.h_in_x = save and plan.mm_dtype == dtype
        self.x = torch.empty(T + 1 if save else 1, B, D + H + A, device=device, dtype=plan.mm_dtype)
        self.c = torch.empty(T + 1 if save else 2, B, H, **like)  # c[t + 1] = c_t, or c_t in slot t % 2
        # Pre-activations [gates | zhat] (4H + 1 columns, 4H at the top), from one matmul.
        self.pre = torch.empty(S, B, 4 * H + (0 if self.top else 1), **like)
        self.gates, self.zhat = self.pre[..., : 4 * H], self.pre[..., 4 * H :]
        # Under autocast, the step's matmul product in its own dtype, which the fused kernels add in (one slot).
        mixed = plan.mm_dtype != dtype
        self.product = torch.empty(B, self.pre.shape[2], device=device, dtype=plan.mm_dtype) if mixed else None
        self.act = torch.empty(S, B, 4 * H, **like)  # sigm(f), sigm(i), sigm(o), tanh(g)
        self.keep_f = torch.empty(S, B, H, **like)  # copy + update*f = d c / d c_prev
        self.tc = torch.empty(S, B, H, **like)  # tanh of (the layer-normalized) c
        # -d h / d copy and -d c / d copy, side by side like the gradients they meet (layer 1 never copies)
        self.neg_d_copy = torch.empty(S, B, 2, H, **like) if save and not self.bottom else None
        self.zraw = torch.empty(S, B, 1, **like) if not self.top else None
        # The layer norms' statistics of every step, for the backward: (mean, rstd) of the four gate blocks and
        # of c.
        ln_stats = save and plan.layer_norm
        self.gates_mean, self.gates_rstd = (torch.empty(S if ln_stats else 0, B, 4, 1, **like) for _ in range(2))
        self.cell_mean, self.cell_rstd = (torch.empty(S if ln_stats else 0, B, 1, **like) for _ in range(2))

        # Per-step views: a call to unbind makes all of them at about the cost of one view each, which still adds
        # up (~2 us a view), so each path makes only those it reads.
        self.c_slots = self.c.unbind(0)
        self.x_t = self.x.unbind(0)
        self.pre_t = self.pre.unbind(0)
        self.x_below_t, self.x_rec_t, self.x_above_t = (part.unbind(0) for part in self.x.split((D, H, A), dim=2))
        self.gates_t, self.zhat_t = self.gates.unbind(0), self.zhat.unbind(0)
        self.keep_f_t, self.tc_t = self.keep_f.unbind(0), self.tc.unbind(0)
        self.zraw_t = self.zraw.unbind(0) if self.zraw is not None else None
        if self.neg_d_copy is not None:
            self.neg_d_copy_t = self.neg_d_copy.flatten(2).unbind(0)  # (B, 2H)
            self.neg_d_h_t, self.neg_d_c_t = (part.unbind(0) for part in self.neg_d_copy.unbind(2))
        if plan.fused:  # the activations, and the layer norm statistics as (B, 4), (B, 4), (B, 1), (B, 1)
            self.act_t = self.act.unbind(0)
            stats = (self.gates_mean[..., 0], self.gates_rstd[..., 0], self.cell_mean, self.cell_rstd)
            self.ln_stats_t = list(zip(*(x.unbind(0) for x in stats), strict=True)) if ln_stats else [(None,) * 4] * S
        else:
            self.f_t, self.i_t, self.o_t, self.g_t = (part.unbind(0) for part in self.act.split(H, dim=2))
            self.fio_t = self.act[..., : 3 * H].unbind(0)
            self.gates_mean_t, self.gates_rstd_t = self.gates_mean.unbind(0), self.gates_rstd.unbind(0)  # (B, 4, 1)
            self.cell_mean_t, self.cell_rstd_t = self.cell_mean.unbind(0), self.cell_rstd.unbind(0)  # (B, 1)

    def attach(self, Z: Tensor) -> None:
        """Make this call's outputs: h (unless it lives in x) and this layer's column of Z (T+1, B, L)."""
        T, B = Z.shape[0] - 1, Z.shape[1]
        if self.h_in_x:
            self.h = self.x[:, :, self.D : self.D + self.H]  # h[t + 1] = h_t; h[0] is the initial state
        else:
            self.h = torch.empty(T + 1, B, self.H, device=Z.device, dtype=Z.dtype)
        self.h_t = self.h.unbind(0)
        self.c_t = self.c_slots if self.save else [self.c_slots[t % 2] for t in range(T + 1)]
        self.z_t = Z[:, :, self.layer : self.layer + 1].unbind(0)  # (B, 1) each


class TapeCache:
    """The tapes of calls without gradient, kept for the next call of the same plan and batch size: sampling
    makes one call per symbol, and building the buffers and views of a tape costs as much as the step itself.
    A tape is taken out while in use, so two calls at once never share one."""

    def __init__(self, size: int = 4):
        self.entries: OrderedDict[tuple, list[LayerTape]] = OrderedDict()
        self.size = size
        self.lock = threading.Lock()

    def take(self, key: tuple) -> list[LayerTape] | None:
        with self.lock:
            return self.entries.pop(key, None)

    def give(self, key: tuple, tapes: list[LayerTape]) -> None:
        with self.lock:
            self.entries[key] = tapes
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)


TAPES = TapeCache()


# --- Forward ---------------------------------------------------------------------------------------------------


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
    # With the fused kernels and the plain layer step, each step's kernels write the next steps' matmul inputs;
    # the first step's come from the initial state.
    linked = plan.fused and step is None
    for layer, tape in enumerate(tapes):
        tape.linked = linked
        if linked and not tape.h_in_x:
            tape.x_rec_t[0].copy_(tape.h_t[0])
        if linked and not tape.top:
            torch.mul(tapes[layer + 1].h_t[0], tape.z_t[0], out=tape.x_above_t[0])
    ones = Z.new_ones(B, 1)  # z^0 = 1, and 1 - z without a slow scalar op
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
    z_below = below.z_t[t + 1] if below is not None else ones

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
    drawing = plan.mode == "sample" and plan.training and above is not None
    addend = None
    if tape.product is not None and base is None and plan.fused and not drawing:
        torch.mm(x, w_t, out=tape.product)  # in the matmul's dtype: the kernel adds it to the pre-activations
        addend = tape.product
    else:
        matmul_add(base, x, w_t, out=tape.pre_t[k])
    if drawing:
        torch.bernoulli(hard_sigmoid(tape.zhat_t[k], plan.slope), out=tape.zraw_t[k])  # the reference's draws

    if plan.fused:
        fused_cell_step(plan, tape, below, above, t, k, ln, z_below, addend)
    else:
        cell_step(plan, tape, below, above, t, k, ln, z_below, ones)


def fused_cell_step(
    plan: Plan, tape: LayerTape, below: LayerTape | None, above: LayerTape | None, t: int, k: int,
    ln: LayerNormParams | None, z_below: Tensor, addend: Tensor | None = None,
) -> None:  # fmt: skip
    """The elementwise part of layer_step in one call of a fused backend (the same arithmetic as cell_step). On a
    linked tape it also writes h_t where the next matmuls read it, masked as they take it: this layer's next input
    (h_rec, where h does not live in x), the layer above's bottom-up input z_t*h_t at this step (h_up), and the
    layer below's top-down input z_below*h_t at the next step (h_down; z_below here is that layer's z_t)."""
    top, bottom, save_copy = above is None, below is None, tape.save and below is not None
    zraw_mode = ZRAW_MODES["step" if plan.mode == "sample" and not plan.training else plan.mode]
    linked, k_next = tape.linked, k + 1 if tape.save else 0
    kernels.load(plan.kernels).cell_forward(
        tape.gates_t[k], None if top else tape.zhat_t[k], addend, *(ln or (None,) * 4),
        tape.h_t[t], tape.c_t[t], tape.z_t[t], None if bottom else z_below,
        tape.act_t[k], tape.keep_f_t[k], tape.c_t[t + 1], tape.tc_t[k], tape.h_t[t + 1],
        tape.x_rec_t[k_next] if linked and not tape.h_in_x else None,
        above.x_below_t[k] if linked and not top else None, below.x_above_t[k_next] if linked and not bottom else None,
        tape.neg_d_h_t[k] if save_copy else None, tape.neg_d_c_t[k] if save_copy else None,
        None if top else tape.zraw_t[k], None if top else tape.z_t[t + 1],
        *tape.ln_stats_t[k], zraw_mode, plan.slope, LN_EPS,
    )  # fmt: skip


# --- Backward --------------------------------------------------------------------------------------------------


class LayerGrads:
    """One layer's backward state: the gradients w.r.t. its h and c (side by side, [dh | dc]) and z at the step
    being processed, summed over everything that reads them; per-step coefficients for all steps at once; and
    the pre-activation gradients ds, the input of the weight gradients."""

    def __init__(self, plan: Plan, tape: LayerTape, layer: int, Z: Tensor, grad_h, grad_c, grad_z):
        B, H = Z.shape[1], tape.H
        # Two [dh | dc] buffers: the current step's, and the previous step's being written.
        self.pair = [torch.zeros(B, 2, H, device=Z.device, dtype=Z.dtype) for _ in range(2)]
        self.pair_flat = [p.flatten(1) for p in self.pair]
        self.pair_h, self.pair_c = [p[:, 0] for p in self.pair], [p[:, 1] for p in self.pair]
        self.cur = 0
        if grad_h is not None:
            self.pair_h[0].copy_(grad_h)
        if grad_c is not None:
            self.pair_c[0].copy_(grad_c)
        # d loss / d z at the step being processed; the fused path writes the previous step's into the other of
        # two buffers (and the gradient that goes to z_below into dz_below).
        self.dz_pair = [torch.zeros(B, 1, device=Z.device, dtype=Z.dtype) for _ in range(2)]
        if grad_z is not None:
            self.dz_pair[0].copy_(grad_z)
        self.dz = self.dz_pair[0]

        T, R = tape.gates.shape[0], 4 * H + tape.zhat.shape[2]
        self.ds = torch.empty(T, B, R, device=Z.device, dtype=Z.dtype)  # d loss / d [gates | zhat]
        self.ds_t = self.ds.unbind(0)
        z_prev = Z[:-1, :, layer : layer + 1]  # (T, B, 1)
        z_below = Z[1:, :, layer - 1 : layer] if layer > 0 else torch.ones_like(z_prev)
        self.z_prev_t, self.z_below_t = z_prev.unbind(0), z_below.unbind(0)
        self.ln_grad = None
        if plan.fused:  # the kernels take it from here
            self.dz_below = torch.empty(B, 1, device=Z.device, dtype=Z.dtype)
            # Under autocast, the step's ds again in the matmul's dtype, written by cell_backward (one slot).
            mixed = plan.mm_dtype != Z.dtype
            self.ds_mm = torch.empty(B, R, device=Z.device, dtype=plan.mm_dtype) if mixed else None
            # Where cell_backward puts the layer norm parameters' gradients (see kernels.ln_grad_rows): each
            # step's rows, for the sums after the loop, or one accumulator for all steps.
            self.ln_out_t = [None] * T
            if plan.layer_norm and kernels.ln_grad_rows(plan.kernels):
                rows = torch.empty(T, B, 5 * H, device=Z.device, dtype=Z.dtype)
                self.dact, self.d_cn, self.ln_out_t = rows[..., : 4 * H], rows[..., 4 * H :], rows.unbind(0)
            elif plan.layer_norm:
                self.ln_grad = Z.new_zeros(10 * H)
                self.ln_out_t = [self.ln_grad] * T
            return

        # Gradients of the gates after their layer norm and of the normalized c: the layer norm gains' inputs.
        # (The fused kernels make them too, or sum the layer norm parameters' gradients as they go.)
        self.dzhat_t, self.dgates_t = self.ds[..., 4 * H :].unbind(0), self.ds[..., : 4 * H].unbind(0)
        self.dact = torch.empty_like(tape.act) if plan.layer_norm else self.ds[..., : 4 * H]
        self.d_cn = torch.empty_like(tape.tc) if plan.layer_norm else None
        self.dfio_t, self.dg_t = self.dact[..., : 3 * H].unbind(0), self.dact[..., 3 * H :].unbind(0)
        self.df_t, self.di_t, self.do_t = (self.dact[..., k * H : (k + 1) * H].unbind(0) for k in range(3))
        self.d_cn_t = self.d_cn.unbind(0) if self.d_cn is not None else None

        # Per-step (B, 1) coefficients, for all steps at once.
        update = z_below - z_prev * z_below
        keep = z_prev + update
        self.update_t, self.keep_t, self.copy_t = update.unbind(0), keep.unbind(0), (1 - keep).unbind(0)
        self.not_flush_t = (1 - z_prev).unbind(0)
        if not tape.top:
            # The straight-through gradient: the hard sigmoid's derivative, as torch.clamp defines it (the
            # bounds count as inside), times keep (z = keep*zraw).
            y = (plan.slope * tape.zhat + 1.0) / 2.0
            st = ((y >= 0) & (y <= 1)).to(y.dtype) * (plan.slope / 2.0)
            self.keep_st_t = (keep * st).unbind(0)

    def swap(self) -> None:
        self.cur = 1 - self.cur


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
    # The loss's gradients of each h_t: the fused cell_backward adds them in (g_ext), the torch ops here.
    ext_h = [g.unbind(1) if g is not None else None for g in grad_hidden]
    if plan.fused:  # the kernels read rows whose last dimension is contiguous
        ext_h = [[g.contiguous() for g in gs] if gs is not None and gs[0].stride(-1) != 1 else gs for gs in ext_h]
    ext_z = grad_boundaries.unbind(1) if grad_boundaries is not None else None
    for t in reversed(range(T)):
        for layer in reversed(range(L)):
            grad = grads[layer]
            if ext_h[layer] is not None and not plan.fused:
                grad.pair_h[grad.cur].add_(ext_h[layer][t])
            if ext_z is not None and layer < L - 1:
                grad.dz += ext_z[t][:, layer : layer + 1]
            below = (tapes[layer - 1], grads[layer - 1]) if layer > 0 else None
            above = (tapes[layer + 1], grads[layer + 1]) if layer < L - 1 else None
            layer_ln = ln[layer] if ln else None
            if plan.fused:
                g_ext = ext_h[layer][t] if ext_h[layer] is not None else None
                fused_layer_step_backward(plan, tapes[layer], grad, below, above, t, w[layer], layer_ln, g_ext)
            else:
                layer_step_backward(plan, tapes[layer], grad, below, above, t, w[layer], layer_ln)
    dh = [g.pair_h[g.cur] for g in grads]
    dc = [g.pair_c[g.cur] for g in grads]
    return grads[0].ds, dh, dc, [g.dz for g in grads], *parameter_gradients(plan, tapes, grads, weights, ln)


def fused_layer_step_backward(
    plan: Plan, tape: LayerTape, grad: LayerGrads, below: tuple | None, above: tuple | None, t: int,
    w: Tensor, ln: LayerNormParams | None, g_ext: Tensor | None,
) -> None:  # fmt: skip
    """layer_step_backward with its elementwise parts in a fused backend: the cell's backward up to ds[t] (with the
    loss's gradient of h_t, g_ext, added in), the matmul, then dx routed to h_{t-1}, the layers around and the
    boundaries."""
    cur, nxt = grad.cur, 1 - grad.cur
    top, bottom = above is None, below is None
    fused = kernels.load(plan.kernels)
    fused.cell_backward(
        grad.pair_flat[cur], g_ext, grad.dz, tape.act_t[t], tape.tc_t[t], tape.c_t[t], tape.c_t[t + 1],
        tape.keep_f_t[t],
        None if bottom else tape.neg_d_copy_t[t], None if top else tape.zraw_t[t], None if top else tape.zhat_t[t],
        tape.gates_t[t] if ln else None, *tape.ln_stats_t[t], ln[0] if ln else None, ln[2] if ln else None,
        grad.ln_out_t[t], grad.z_prev_t[t], None if bottom else grad.z_below_t[t],
        grad.ds_t[t], grad.ds_mm, grad.pair_c[nxt], grad.dz_pair[nxt], None if bottom else grad.dz_below, plan.slope,
    )  # fmt: skip
    dx = torch.mm(grad.ds_t[t] if grad.ds_mm is None else grad.ds_mm, w)  # (B, K), in the matmul's dtype
    tape_above, grad_above = above or (None, None)
    tape_below, grad_below = below or (None, None)
    fused.route_backward(
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
        if ln is not None and grad.ln_grad is not None:
            H = tape.H
            gain, bias, cell_gain, cell_bias = grad.ln_grad.split((4 * H, 4 * H, H, H))
            grad_ln.append((gain.view(4, H), bias.view(4, H), cell_gain, cell_bias))
        elif ln is not None:
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


# --- The autograd node and the entry point ---------------------------------------------------------------------


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
