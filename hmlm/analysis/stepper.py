"""Sampling's stepper: one stream, one symbol at a time, without gradient, skipping the layers that COPY."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from hmlm import fast
from hmlm.fast.copy_skip import COUNTS, enabled, skips
from hmlm.model import CharLM, HMLSTMState
from hmlm.model.charlm import input_table


class Stepper:
    """Steps a CharLM (an HM-LSTM on the fast path) one symbol at a time, without gradient, from a given state.

    What a call of the model does per symbol and nn.LSTM does not pay for is made once here: the plan, the tapes
    and their views, the transposed weights, layer 1's input projection for every symbol (a table, each row made
    by the same call the model makes for one symbol), the state's buffers (two slots, used in turn). Per symbol
    there remain the layer steps of hmlm/fast/ (skipped for a layer that copies) and the output module, whose
    per-layer projections W^e_l h^l are kept and recomputed only for the layers whose h changed:
        g = sigm(W_g [h^1; ...; h^L] + b_g)        h^e = ReLU(sum_l g^l P_l)   with P_l = W^e_l h^l
    The logits returned are a buffer that the next step overwrites.
    """

    def __init__(self, model: CharLM, state: HMLSTMState):
        rnn, out = model.rnn, model.output
        weight = rnn.weight[0]
        device, dtype = weight.device, weight.dtype
        plan = rnn.fast_plan(device, dtype)
        # Detached, so that a step needs no torch.no_grad (entering it costs more than a small layer step).
        _, _, weights, biases, ln = rnn.fast_parameters()
        weights, biases = detached(weights), detached(biases[1:])
        ln = [detached(layer) for layer in ln] if ln is not None else None
        self.plan, self.ln = plan, ln
        self.skip = skips(plan, device, dtype)  # on CUDA every layer computes (no host read of z per step)
        L, sizes = plan.num_layers, plan.hidden_sizes
        like = {"device": device, "dtype": dtype}

        # Layer 1's projected input per symbol, from the table the model's own calls take it from.
        self.bases_1 = list(input_table(model).unsqueeze(1).unbind(0))  # V x (1, R_1)
        self.bases = biases
        self.w_t = [w.t() for w in weights]  # as hmlm/fast/forward.py's step_weights for T < 16

        # The state: two slots, read from one and written to the other in turn. Every layer's h lives in one
        # (2, 1, sum H) buffer, the output module's input as it is.
        offsets = np.cumsum([0, *sizes])
        self.h_all = torch.zeros(2, 1, int(offsets[-1]), **like)
        self.Z = torch.zeros(2, 1, L, **like)
        self.tapes = [fast.LayerTape(plan, layer, 1, 1, device, dtype, save=False) for layer in range(L)]
        for layer, tape in enumerate(self.tapes):
            h = [self.h_all[s, :, offsets[layer] : offsets[layer + 1]] for s in (0, 1)]  # (1, H_l) each
            z = [self.Z[s, :, layer : layer + 1] for s in (0, 1)]
            tape.h_t, tape.c_t, tape.z_t = [*h, h[0]], [*tape.c_slots, tape.c_slots[0]], [*z, z[0]]
        self.ones = torch.ones(1, 1, **like)
        self.slot = 0  # the slot that holds the current state
        if self.skip:  # numpy views, to read z and copy a state without a torch call
            self.z_np = self.Z.numpy()[:, 0]  # (2, L)
            self.h_np = [[tape.h_t[s].numpy() for s in (0, 1)] for tape in self.tapes]
            self.c_np = [[tape.c_slots[s].numpy() for s in (0, 1)] for tape in self.tapes]
        self.load(state)

        # The output module: the gate logits' weight, the per-layer projections and their kept products.
        self.gate_w_t = out.gate.weight.detach().t()  # (sum H, L)
        self.gate_b = out.gate.bias.detach() if out.gate.bias is not None else torch.zeros(L, **like)  # (L,)
        embed_w = out.embed.weight.detach()  # (E_out, sum H)
        self.embed_w_t = [embed_w[:, offsets[i] : offsets[i + 1]].t() for i in range(L)]  # (H_l, E_out)
        self.logits_w_t, self.logits_b = out.logits.weight.detach().t(), out.logits.bias.detach()
        self.P = torch.zeros(L, embed_w.shape[0], **like)  # P_l = W^e_l h^l
        self.P_rows = self.P.split(1, dim=0)
        self.gate_pre, self.gate = torch.empty(1, L, **like), torch.empty(1, L, **like)
        self.embedded = torch.empty(1, embed_w.shape[0], **like)
        self.logits = torch.empty(1, self.logits_b.shape[0], **like)
        self.stale = [True] * L  # per layer: whether P_l is out of date (h^l changed since it was computed)

    def load(self, state: HMLSTMState) -> None:
        """Make `state` (batch 1) the current one."""
        s = self.slot
        with torch.no_grad():
            for layer, tape in enumerate(self.tapes):
                tape.h_t[s].copy_(state.h[layer])
                tape.c_t[s].copy_(state.c[layer])
                tape.z_t[s].copy_(state.z[layer])
        self.stale = [True] * len(self.tapes)
        self.copied = [False] * len(self.tapes)  # per layer: whether it copied at the step before (cell: seed)

    def step(self, symbol: int) -> Tensor:
        """Feed one symbol; the logits (1, V) of the next."""
        plan, tapes, s = self.plan, self.tapes, self.slot
        n = 1 - s  # the slot written
        L = len(tapes)
        for layer, tape in enumerate(tapes):
            below = tapes[layer - 1] if layer > 0 else None
            above = tapes[layer + 1] if layer < L - 1 else None
            copies = below is not None and self.skip and self.z_np[s, layer] == 0 and self.z_np[n, layer - 1] == 0
            # The seed's cell: a COPY computes its boundary, unless the layer copied at the step before as well
            # (hmlm/fast/copy_skip.py's docstring)
            skips = copies and (not plan.seed or self.copied[layer])
            self.copied[layer] = copies
            if skips:
                # COPY: h and c stay, z = 0 (written with numpy: a torch call costs microseconds)
                self.h_np[layer][n][:] = self.h_np[layer][s]
                self.c_np[layer][n][:] = self.c_np[layer][s]
                self.z_np[n, layer] = 0
                COUNTS.add(layer, 1, 1, 1, 1)
                continue
            base = self.bases_1[symbol] if below is None else self.bases[layer - 1]
            fast.layer_step(plan, tape, below, above, s, 0, base, self.w_t[layer], self.ln[layer] if self.ln else None,
                            self.ones)  # fmt: skip
            self.stale[layer] = True
            COUNTS.add(layer, 1, 1, int(copies), 0)
        self.slot = n
        return self.output()

    @property
    def boundaries(self) -> Tensor:
        """(1, 1, L-1): the lower layers' z at the last step, a view that the next step overwrites."""
        return self.Z[self.slot, :, None, :-1]

    def output(self) -> Tensor:
        """The output module on the current state, reusing W^e_l h^l of the layers whose h did not change."""
        h_all = self.h_all[self.slot]  # (1, sum H)
        torch.addmm(self.gate_b, h_all, self.gate_w_t, out=self.gate_pre)
        torch.sigmoid(self.gate_pre, out=self.gate)  # (1, L)
        for layer, tape in enumerate(self.tapes):
            if self.stale[layer]:
                torch.mm(tape.h_t[self.slot], self.embed_w_t[layer], out=self.P_rows[layer])
                self.stale[layer] = False
        torch.mm(self.gate, self.P, out=self.embedded)  # sum_l g^l P_l   (1, E_out)
        self.embedded.relu_()
        return torch.addmm(self.logits_b, self.embedded, self.logits_w_t, out=self.logits)


def detached(tensors) -> list[Tensor]:
    return [t.detach() for t in tensors]


def stepper_for(model: CharLM, state: HMLSTMState) -> Stepper | None:
    """A Stepper for this model, or None where the model's own call is the path (HMLM_SKIP_COPY=0, an LSTM, or the
    reference implementation)."""
    if not enabled() or model.config.kind != "hmlstm" or model.rnn.impl != "fast":
        return None
    return Stepper(model, state)
