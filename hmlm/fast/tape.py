"""The fast path's state for one call: what it computes (Plan), each layer's buffers and their per-step views
(LayerTape, kept between calls without gradient by TapeCache), and each layer's backward state (LayerGrads)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from hmlm.fast import kernels


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
    kernels: str = "torch"  # the backend of each step's elementwise work: "torch", "cpu" or "triton" (kernels.load)
    cell: str = "hmlm"  # "hmlm" or "seed" (hmlm/cell.py): the seed's boundary on COPY steps and its gradient

    @property
    def seed(self) -> bool:
        return self.cell == "seed"

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)


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
        # Whether the kernels of this and the neighbouring layers write this layer's next matmul input (h_rec,
        # h_up, h_down: see forward.cell_step) instead of layer_step's own masking (set per call).
        self.linked = False

        # The matmul inputs [z_below h_below | h_prev | z_prev h_above] of every step (B, D + H + A), slot t for
        # step t (slot T: h_{T-1}), or one slot reused. h_t is written straight into the h_prev part of slot t + 1,
        # unless the matmuls run in another dtype (autocast) or only one slot is kept; then h has its own buffer
        # and the kernels write it into x as well (h_rec).
        self.h_in_x = save and plan.mm_dtype == dtype
        self.x = torch.empty(T + 1 if save else 1, B, D + H + A, device=device, dtype=plan.mm_dtype)
        self.c = torch.empty(T + 1 if save else 2, B, H, **like)  # c[t + 1] = c_t, or c_t in slot t % 2
        # Pre-activations [gates | zhat] (4H + 1 columns, 4H at the top), from one matmul.
        self.pre = torch.empty(S, B, 4 * H + (0 if self.top else 1), **like)
        self.gates, self.zhat = self.pre[..., : 4 * H], self.pre[..., 4 * H :]
        # Under autocast, the step's matmul product in its own dtype, which the kernels add in (one slot).
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
        self.act_t = self.act.unbind(0)
        if self.neg_d_copy is not None:
            self.neg_d_copy_t = self.neg_d_copy.flatten(2).unbind(0)  # (B, 2H)
            self.neg_d_h_t, self.neg_d_c_t = (part.unbind(0) for part in self.neg_d_copy.unbind(2))
        # The layer norm statistics as the kernels take them: (B, 4), (B, 4), (B, 1), (B, 1).
        stats = (self.gates_mean[..., 0], self.gates_rstd[..., 0], self.cell_mean, self.cell_rstd)
        self.ln_stats_t = list(zip(*(x.unbind(0) for x in stats), strict=True)) if ln_stats else [(None,) * 4] * S

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


class LayerGrads:
    """One layer's backward state: the gradients w.r.t. its h and c (side by side, [dh | dc]) and z at the step
    being processed, summed over everything that reads them; the pre-activation gradients ds, the input of the
    weight gradients; and where the kernels put the layer norm parameters' gradients."""

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
        # d loss / d z at the step being processed; the kernels write the previous step's into the other of two
        # buffers (and the gradient that goes to z_below into dz_below).
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
        self.dz_below = torch.empty(B, 1, device=Z.device, dtype=Z.dtype)
        # Under autocast, the step's ds again in the matmul's dtype, written by cell_backward (one slot).
        mixed = plan.mm_dtype != Z.dtype
        self.ds_mm = torch.empty(B, R, device=Z.device, dtype=plan.mm_dtype) if mixed else None
        # Where cell_backward puts the layer norm parameters' gradients (see kernels.ln_grad_rows): each step's
        # rows, for the sums after the loop, or one accumulator for all steps.
        self.ln_grad = None
        self.ln_out_t = [None] * T
        if plan.layer_norm and kernels.ln_grad_rows(plan.kernels):
            rows = torch.empty(T, B, 5 * H, device=Z.device, dtype=Z.dtype)
            self.dact, self.d_cn, self.ln_out_t = rows[..., : 4 * H], rows[..., 4 * H :], rows.unbind(0)
        elif plan.layer_norm:
            self.ln_grad = Z.new_zeros(10 * H)
            self.ln_out_t = [self.ln_grad] * T

    def swap(self) -> None:
        self.cur = 1 - self.cur
