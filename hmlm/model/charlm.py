"""The character-level language model: embedding -> HM-LSTM (or nn.LSTM for kind: lstm) -> the paper's output
module (eqs. 11-12) -> logits. Without gradient on the CPU, layer 1's input projection is looked up in a table of
every symbol's (`input_table`) rather than computed per token."""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmlm.model.hmlstm import HMLSTM, HMLSTMState, ModelConfig


class OutputModule(nn.Module):
    """Paper eqs. 11-12: a scalar gate per layer, a gated sum of projections, ReLU, then the vocabulary."""

    def __init__(self, hidden_sizes: list[int], output_embed_dim: int, vocab_size: int, cell: str = "hmlm"):
        super().__init__()
        total = sum(hidden_sizes)
        self.hidden_sizes = list(hidden_sizes)
        # w^l . [h^1; ...; h^L] for every l at once; eq. 11 has no bias, nor has the seed's (cell: seed), hmlm's has
        self.gate = nn.Linear(total, len(hidden_sizes), bias=cell == "hmlm")
        # sum_l g^l W^e_l h^l = [W^e_1 ... W^e_L] [g^1 h^1; ...; g^L h^L]: one matmul for all layers.
        self.embed = nn.Linear(total, output_embed_dim, bias=False)
        self.logits = nn.Linear(output_embed_dim, vocab_size)
        if cell == "seed":  # the seed's two dense layers (tf.layers.dense): Glorot-uniform
            nn.init.xavier_uniform_(self.gate.weight)
            nn.init.xavier_uniform_(self.embed.weight)

    def forward(self, hidden: list[Tensor]) -> tuple[Tensor, Tensor]:
        """hidden: L tensors (B, T, H_l). Returns logits (B, T, V) and the gates (B, T, L)."""
        h_all = torch.cat(hidden, dim=-1)  # (B, T, sum H)
        gates = torch.sigmoid(self.gate(h_all))  # (B, T, L)
        gated = torch.cat([gates[..., layer : layer + 1] * h for layer, h in enumerate(hidden)], dim=-1)
        return self.logits(F.relu(self.embed(gated))), gates


class CharLMOutput(NamedTuple):
    logits: Tensor  # (B, T, vocab_size)
    boundaries: Tensor  # (B, T, L-1); (B, T, 0) for the LSTM baseline
    state: HMLSTMState
    gates: Tensor  # (B, T, L) the output module's per-layer gates; (B, T, 0) for the LSTM baseline
    zhat: Tensor | None = None  # (B, T, L-1) the boundary detectors' pre-activations, with with_zhat=True


class CharLM(nn.Module):
    """Embedding -> HM-LSTM (or nn.LSTM for kind: lstm) -> output module -> logits."""

    def __init__(self, vocab_size: int, config: ModelConfig | None = None):
        super().__init__()
        self.config = config or ModelConfig()
        self.config.validate()
        self.vocab_size = vocab_size
        cfg = self.config
        self.embedding = nn.Embedding(vocab_size, cfg.embed_dim)
        if cfg.kind == "lstm":
            self.lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_sizes[0], num_layers=len(cfg.hidden_sizes), batch_first=True)
            self.head = nn.Linear(cfg.hidden_sizes[0], vocab_size)
        else:
            self.rnn = HMLSTM(
                cfg.embed_dim, cfg.hidden_sizes, cfg.layer_norm, cfg.boundary, boundary_bias=cfg.boundary_bias,
                cell=cfg.cell,
            )  # fmt: skip
            self.output = OutputModule(cfg.hidden_sizes, cfg.output_embed_dim, vocab_size, cfg.cell)

    def initial_state(self, batch_size: int, device=None) -> HMLSTMState:
        if self.config.kind == "lstm":
            device = device or self.head.weight.device
            zeros = [torch.zeros(batch_size, h, device=device) for h in self.config.hidden_sizes]
            return HMLSTMState(h=zeros, c=[t.clone() for t in zeros], z=[])
        return self.rnn.initial_state(batch_size, device)

    def forward(
        self, tokens: Tensor, state: HMLSTMState | None = None, slope: float | Tensor = 1.0, with_zhat: bool = False
    ) -> CharLMOutput:
        """tokens: (B, T) long. `slope` changes only the gradients of the boundary detectors. `with_zhat` adds the
        boundary detectors' pre-activations to the output (an HM-LSTM only)."""
        B, T = tokens.shape
        x = self.embedding(tokens)  # (B, T, E)
        if self.config.kind == "lstm":
            state = state if state is not None else self.initial_state(B, tokens.device)
            out, (h, c) = self.lstm(x, (torch.stack(state.h), torch.stack(state.c)))
            empty = x.new_zeros(B, T, 0)
            return CharLMOutput(self.head(out), empty, HMLSTMState(list(h.unbind(0)), list(c.unbind(0)), []), empty)
        projected = projected_input(self, tokens)  # at inference, a table's rows (below)
        rnn_out = self.rnn(x, state, slope, with_zhat, projected)
        logits, gates = self.output(rnn_out.hidden)
        return CharLMOutput(logits, rnn_out.boundaries, rnn_out.state, gates, rnn_out.zhat)


# --- Layer 1's input at inference: a table of every symbol's projection
# ------------------------------------------------------

TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # CharLM -> (its parameters' versions, table)


def input_table(model: CharLM) -> Tensor:
    """Every symbol's layer-1 input projection W_in e_v + b_in, (V, R_1): made once, until the parameters change."""
    rnn = model.rnn
    sources = (model.embedding.weight, rnn.weight._parameters["0"], rnn.bias._parameters["0"])  # (cheaper than [0])
    versions = tuple((p.data_ptr(), p._version) for p in sources)
    kept = TABLES.get(model)
    if kept is None or kept[0] != versions:
        w_in, b_in, *_ = rnn.fast_parameters()
        with torch.no_grad():
            kept = TABLES[model] = (versions, F.linear(sources[0], w_in, b_in))
    return kept[1]


def projected_input(model: CharLM, tokens: Tensor) -> Tensor | None:
    """Layer 1's projected input (T, B, R_1) of a call without gradient on the CPU, skipping or not: the input is
    one of V symbols, so its projection is one of V rows of input_table, looked up (at the PTB shape ~1/3 of the
    time of the matmul over the embedded tokens that training makes; the same numbers up to rounding, which no
    two paths of one inference mix: the Stepper steps from the same table). None where the model's own matmul is
    the path: with gradients, on CUDA, under autocast, for the reference implementation."""
    cpu = tokens.device.type == "cpu"
    if torch.is_grad_enabled() or not cpu or model.rnn.impl != "fast" or torch.is_autocast_enabled("cpu"):
        return None
    B, T = tokens.shape
    return torch.index_select(input_table(model), 0, tokens.t().reshape(-1)).view(T, B, -1)
