"""One text read through a model from a fresh state: its boundaries, gates and statistics, and a text view."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hmlm.analysis.boundaries.metrics import THRESHOLD, BoundaryStats, score, space_gaps
from hmlm.data import Vocab
from hmlm.errors import UserError
from hmlm.model import CharLM


@dataclass
class TextBoundaries:
    """What the model does on one text, read from a fresh state."""

    text: str
    ids: list[int]  # (T,) token ids
    symbols: list[str]  # (T,) the symbol at each position (the space symbol as " "; "" inside a multi-byte char)
    boundaries: np.ndarray  # (T, L-1) z^1..z^{L-1}
    gates: np.ndarray  # (T, L) the output module's g^1..g^L
    stats: BoundaryStats

    def to_json(self) -> dict:
        """{"text", "symbols", "boundaries": {"layer1": [...]}, "gates": {...}, and the flat statistics}."""

        def values(z: np.ndarray) -> list:
            binary = np.isin(z, (0.0, 1.0)).all()  # step and sample boundaries: 0/1; soft ones: their values
            return [int(v) for v in z.tolist()] if binary else [float(v) for v in z.tolist()]

        return {
            "text": self.text,
            "symbols": self.symbols,
            "boundaries": {f"layer{i + 1}": values(self.boundaries[:, i]) for i in range(self.boundaries.shape[1])},
            "gates": {f"layer{i + 1}": self.gates[:, i].tolist() for i in range(self.gates.shape[1])},
        } | self.stats.flat()

    def view(self, wrap: int = 100) -> str:
        """The text, and under it one line per layer with "|" where the layer closes a segment; wrapped at `wrap`."""
        glyphs = "".join(glyph(s) for s in self.symbols)
        per_row = row_length(len(glyphs), wrap)
        lines = []
        for start in range(0, len(glyphs), per_row):
            stop = start + per_row
            lines.append(f"{'text':>9}  {glyphs[start:stop]}")
            for layer in range(self.boundaries.shape[1]):
                marks = "".join("|" if z > THRESHOLD else " " for z in self.boundaries[start:stop, layer])
                lines.append(f"{f'layer {layer + 1}':>9}  {marks}".rstrip())
            lines.append("")
        return "\n".join(lines) + self.stats.table()


def symbols_of(vocab: Vocab, ids: list[int]) -> list[str]:
    """The readable symbol at each position. For bytes, a character that takes several bytes stands on its first
    byte, with "" on the others (and U+FFFD on a byte that starts no valid character)."""
    if vocab.kind != "bytes":
        return [vocab.decode([i]) for i in ids]
    data = bytes(vocab.symbols[i] for i in ids)
    out: list[str] = []
    while len(out) < len(data):
        start = len(out)
        lead = data[start]
        size = 1 if lead < 0x80 else 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4
        try:
            out += [data[start : start + size].decode("utf-8")] + [""] * (size - 1)
        except UnicodeDecodeError:
            out.append("\ufffd")
    return out


def glyph(symbol: str) -> str:
    """One printable glyph per position, so the marks line up: a newline as "↵", another control as "·"."""
    if symbol == "\n":
        return "\u21b5"
    if symbol == "":
        return "\u00b7"
    return symbol if symbol.isprintable() else "\u00b7"


def require_boundaries(model: CharLM) -> None:
    """A UserError unless the model has boundary detectors (an HM-LSTM of two layers or more)."""
    if model.config.kind == "lstm" or len(model.config.hidden_sizes) < 2:
        raise UserError(
            "this model has no boundary detectors (an LSTM baseline or a one-layer HM-LSTM): use an HM-LSTM run "
            "with two layers or more"
        )


@torch.no_grad()
def read_text(model: CharLM, vocab: Vocab, text: str, seed: int = 0) -> TextBoundaries:
    """Feed `text` from a fresh state in eval mode; its boundaries, gates and statistics against the space symbol."""
    if not text:
        raise UserError("--text must hold at least one character")
    require_boundaries(model)
    ids = vocab.encode(text)  # a UserError naming any character outside the vocabulary
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = model(torch.tensor([ids], device=device))  # (1, T): state None = fresh
    model.train(was_training)
    boundaries = out.boundaries[0].float().cpu().numpy()  # (T, L-1)
    gates = out.gates[0].float().cpu().numpy()  # (T, L)
    references = {}
    if vocab.space_id is not None:
        # The gap after the last symbol is unknown (the text stops there): no reference in it.
        references["word"] = np.append(space_gaps(np.array(ids), vocab.space_id), False)[None]  # (1, T + 1)
    # The surprisal of each next symbol of the text; after the last one, unknown (NaN).
    log_probs = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)  # (T - 1, V)
    surprisal = np.full(len(ids), np.nan)
    surprisal[:-1] = -log_probs.gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].cpu().numpy()
    stats = score(boundaries[None], references, seed, surprisal[None])
    return TextBoundaries(text, ids, symbols_of(vocab, ids), boundaries, gates, stats)


def row_length(symbols: int, wrap: int) -> int:
    """Symbols per row when `symbols` are wrapped at `wrap`: rows of even length, so no short stub is left over."""
    return math.ceil(symbols / max(1, math.ceil(symbols / wrap)))
