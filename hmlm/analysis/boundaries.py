"""What each layer's boundary detector learns: statistics, scores against word (and phrase) boundaries, the figure.

A lower layer l < L closes a segment at step t when z^l_t = 1 (docs/design.md, "The model"). This module measures

- each layer's firing rate (the mean of z; soft boundaries count with their value) and its mean segment length
  (symbols per closed segment: z = 1 thresholded at 0.5, the first segment starting with the text);
- precision, recall and F1 of each layer's boundaries against reference boundaries, with three baselines: a
  boundary after every symbol, random boundaries at the layer's own rate (seeded), and boundaries where the
  model's own surprisal of the next symbol peaks (the classic cue of unsupervised word segmentation: position t
  when -log p(x_{t+1} | x_<=t) is larger than at both neighbours, or than the one neighbour at a stream's edge);

and draws them over a text, like Figure 3 of the paper (`hmlm boundaries RUN --text ...`).

Scoring, precisely. References sit in the gaps between symbols: gap t lies just before symbol t (gaps 0..N for
N symbols). A word ending on symbol r puts a reference in gap r + 1.
- `word`: the dataset's true word ends where it stores them (the synthetic corpus), otherwise the positions of the
  vocabulary's space symbol: a space at position s is the reference gap s (the word before it ends at s - 1).
- `phrase`: the true phrase ends, where stored.
A predicted boundary at position t (z^l_t > 0.5) can hit the reference gap t + 1 (it fired on the last symbol
of the unit) or the gap t (it fired one step later, on the space or the separator after the unit). With spaces:
the prediction at t is a hit when token t or token t + 1 is the space symbol. Each prediction hits at most one
reference and each reference is hit at most once; `hits` is the largest number of such pairs (a maximum
matching, which equals matching left to right, each prediction taking the earlier free reference). Then
precision = hits / predictions, recall = hits / references, F1 = 2PR / (P + R), each 0 when its denominator is.
So a layer that fires on both the last letter and the space of a word gets one hit and one false alarm, and a
layer that fires on the first letter of the next word misses.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from hmlm.data import Dataset, Vocab
from hmlm.errors import UserError
from hmlm.model import CharLM

THRESHOLD = 0.5  # z above it counts as a boundary (soft boundaries lie in [0, 1]; step and sample give 0 or 1)
METRICS = ("precision", "recall", "f1")
SURPRISAL_PEAK = "surprisal_peak"  # the scorer of the surprisal-peak baseline


# ---- references --------------------------------------------------------------------------------------------------


def space_gaps(tokens: np.ndarray, space_id: int) -> np.ndarray:
    """(N,) bool: gap t (just before token t) is a word boundary when token t is the space symbol."""
    return np.asarray(tokens) == space_id


def end_gaps(ends: np.ndarray) -> np.ndarray:
    """(N,) bool from (N,) unit ends (1 on the last symbol of each unit): gap t is a boundary when t - 1 ends one.
    Gap 0 would need the symbol before the array, which is unknown: no boundary there."""
    ends = np.asarray(ends, dtype=bool)
    return np.concatenate([np.zeros(1, dtype=bool), ends[:-1]])


def reference_gaps(
    tokens: np.ndarray, space_id: int | None, true_ends: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """{"word": (N,) bool, "phrase": ...} aligned with `tokens` (see the module docstring); {} when none is known.
    True word ends win over the space symbol, which misses words that end before a comma or a full stop."""
    true_ends = true_ends or {}
    references: dict[str, np.ndarray] = {}
    if "word" in true_ends:
        references["word"] = end_gaps(true_ends["word"])
    elif space_id is not None:
        references["word"] = space_gaps(tokens, space_id)
    for level, ends in true_ends.items():
        if level != "word":
            references[level] = end_gaps(ends)
    return references


def split_references(dataset: Dataset, split: str) -> dict[str, np.ndarray]:
    """The reference gaps of a whole split, for `evaluate(..., references=...)`."""
    return reference_gaps(dataset.split(split), dataset.vocab.space_id, dataset.true_boundaries(split))


# ---- counting ----------------------------------------------------------------------------------------------------


def count_hits(predicted: np.ndarray, gaps: np.ndarray) -> int:
    """The maximum matching of the module docstring. predicted: (S, P) bool, gaps: (S, P + 1) bool, per stream.

    Prediction t may pair with gap t or gap t + 1, so in the sequence gap 0, pred 0, gap 1, pred 1, ..., gap P each
    item may pair only with its neighbours: the pairs form paths, one per run of present items, and a run of k
    items holds k // 2 pairs."""
    streams, positions = predicted.shape
    if gaps.shape != (streams, positions + 1):
        raise ValueError(f"gaps must be (S, P + 1) = {(streams, positions + 1)} for predicted {predicted.shape}")
    # A zero column on each side separates the streams; int8 keeps a 5M-symbol split at a few bytes per symbol.
    line = np.zeros((streams, 2 * positions + 3), dtype=np.int8)
    line[:, 1 : 2 * positions + 2 : 2] = gaps
    line[:, 2 : 2 * positions + 1 : 2] = predicted
    edges = np.diff(line.ravel())  # +1 where a run starts, -1 just after it ends
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int(((stops - starts) // 2).sum())


@dataclass
class Match:
    """Predicted boundaries against reference boundaries: counts, so that parts (streams, processes) add up."""

    hits: int = 0
    predicted: int = 0
    reference: int = 0

    @property
    def precision(self) -> float:
        return self.hits / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.reference if self.reference else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def match(predicted: np.ndarray, gaps: np.ndarray) -> Match:
    """Score predictions (P,) or (S, P) (bool, or z values thresholded at 0.5) against gaps (P + 1,) or (S, P + 1)."""
    predicted = np.atleast_2d(np.asarray(predicted) > THRESHOLD)
    gaps = np.atleast_2d(np.asarray(gaps, dtype=bool))
    return Match(count_hits(predicted, gaps), int(predicted.sum()), int(gaps.sum()))


@dataclass
class Activity:
    """How often one layer closes a segment, as sums over positions."""

    positions: int = 0
    fired: float = 0.0  # the sum of z (a soft boundary counts with its value)
    boundaries: int = 0  # positions with z > 0.5
    closed: int = 0  # symbols in segments closed within the text: up to and including each stream's last boundary

    @property
    def rate(self) -> float:
        return self.fired / self.positions if self.positions else 0.0

    @property
    def mean_segment(self) -> float | None:
        """Symbols per closed segment; None when the layer never fired."""
        return self.closed / self.boundaries if self.boundaries else None


def activity(z: np.ndarray) -> Activity:
    """z: (S, P) one layer's boundaries, every stream starting from a fresh state."""
    fired = z > THRESHOLD
    last = np.where(fired.any(axis=1), z.shape[1] - np.argmax(fired[:, ::-1], axis=1), 0)  # (S,) last boundary + 1
    return Activity(int(z.size), float(z.sum(dtype=np.float64)), int(fired.sum()), int(last.sum()))


# ---- all statistics ----------------------------------------------------------------------------------------------


@dataclass
class BoundaryStats:
    """Every layer's activity, and every scorer's Match against every reference.

    `matches[reference][scorer]`, scorers: "layer1".. (the model), "every_char" (a boundary after every symbol),
    "random_layer1".. (random boundaries at that layer's rate) and, when the surprisal was given, "surprisal_peak"
    (the model's own surprisal peaks). All counts, so that parts add up (`+`)."""

    layers: list[Activity]
    matches: dict[str, dict[str, Match]]

    def __add__(self, other: BoundaryStats) -> BoundaryStats:
        return self.with_numbers([a + b for a, b in zip(self.numbers(), other.numbers(), strict=True)])

    def _parts(self) -> Iterator[Activity | Match]:
        yield from self.layers
        for reference in self.matches.values():
            yield from reference.values()

    def numbers(self) -> list[float]:
        """Every count as one flat list, so that processes can add theirs with one all-reduce."""
        return [float(getattr(part, f.name)) for part in self._parts() for f in fields(part)]

    def with_numbers(self, numbers: list[float]) -> BoundaryStats:
        """The same structure holding `numbers` (from `numbers()`, possibly summed over processes)."""
        values = iter(numbers)

        def rebuild(part: Activity | Match) -> Activity | Match:
            return type(part)(**{f.name: type(getattr(part, f.name))(next(values)) for f in fields(part)})

        layers = [rebuild(layer) for layer in self.layers]
        matches = {ref: {name: rebuild(m) for name, m in scorers.items()} for ref, scorers in self.matches.items()}
        return BoundaryStats(layers, matches)  # type: ignore[arg-type]

    def flat(self, baselines: bool = True, rates: bool = True) -> dict[str, float | None]:
        """Flat keys for JSON and TensorBoard: boundary_f1_word_layer1, boundary_f1_word_every_char, ...
        Without `baselines`, only the model's own: its layers and its surprisal peaks."""
        out: dict[str, float | None] = {}
        for layer, act in enumerate(self.layers, start=1):
            if rates:
                out[f"boundary_rate_layer{layer}"] = act.rate
            out[f"boundary_mean_segment_layer{layer}"] = act.mean_segment
        for reference, scorers in self.matches.items():
            for scorer, m in scorers.items():
                if baselines or scorer.startswith("layer") or scorer == SURPRISAL_PEAK:
                    out |= {f"boundary_{metric}_{reference}_{scorer}": getattr(m, metric) for metric in METRICS}
        peaks = next(iter(self.matches.values()), {}).get(SURPRISAL_PEAK)
        if peaks is not None and self.layers and self.layers[0].positions:
            out[f"boundary_rate_{SURPRISAL_PEAK}"] = peaks.predicted / self.layers[0].positions
        return out

    def table(self) -> str:
        """The statistics as an aligned text table: one row per layer, then the baselines."""
        references = list(self.matches)
        columns = "".join(f" | {ref + ' P':>9}{'R':>7}{'F1':>7}" for ref in references)
        rows = [f"{'':16}{'rate':>7}{'mean seg':>10}{columns}"]

        def row(label: str, rate: float, segment: float | None, scorer: str) -> str:
            seg = f"{segment:10.2f}" if segment is not None else f"{'-':>10}"
            scores = "".join(
                f" | {m.precision:9.3f}{m.recall:7.3f}{m.f1:7.3f}"
                for m in (self.matches[ref][scorer] for ref in references)
            )
            return f"{label:16}{rate:7.3f}{seg}{scores}"

        for layer, act in enumerate(self.layers, start=1):
            rows.append(row(f"layer {layer}", act.rate, act.mean_segment, f"layer{layer}"))
        if references:
            rows.append(row("every symbol", 1.0, 1.0, "every_char"))
            for layer, act in enumerate(self.layers, start=1):
                boundaries = act.boundaries / act.positions if act.positions else 0.0
                rows.append(row(f"random @ layer {layer}", boundaries, None, f"random_layer{layer}"))
            peaks = self.matches[references[0]].get(SURPRISAL_PEAK)
            if peaks is not None:
                positions = self.layers[0].positions if self.layers else 0
                rows.append(row("surprisal peaks", peaks.predicted / positions if positions else 0.0, None,
                                SURPRISAL_PEAK))  # fmt: skip
        return "\n".join(rows)


def surprisal_peaks(surprisal: np.ndarray) -> np.ndarray:
    """(S, P) bool: position t is a peak when its surprisal is larger than at both neighbours in its stream (than
    the one neighbour at either end). A NaN (unknown: e.g. the last symbol of a text, whose successor is not
    given) is never a peak and does not count as a neighbour."""
    s = np.where(np.isnan(surprisal), -np.inf, np.atleast_2d(surprisal))
    padded = np.pad(s, ((0, 0), (1, 1)), constant_values=-np.inf)  # (S, P + 2)
    return np.isfinite(s) & (s > padded[:, :-2]) & (s > padded[:, 2:])


def score(
    boundaries: np.ndarray,
    references: Mapping[str, np.ndarray],
    seed: int = 0,
    surprisal: np.ndarray | None = None,
) -> BoundaryStats:
    """Statistics of boundaries (S, P, L-1) (z values of S streams, each from a fresh state) against references
    {name: (S, P + 1) bool gaps}. The random baseline of layer l draws from numpy's generator seeded (seed, l).
    surprisal (S, P): the model's -log p of the symbol after each position, for the surprisal-peak baseline."""
    streams, positions, layers = boundaries.shape
    acts = [activity(boundaries[:, :, layer]) for layer in range(layers)]
    every = np.ones((streams, positions), dtype=bool)
    randoms = []
    for layer, act in enumerate(acts):
        rate = act.boundaries / act.positions if act.positions else 0.0
        randoms.append(np.random.default_rng([seed, layer]).random((streams, positions), dtype=np.float32) < rate)
    matches = {}
    for name, gaps in references.items():
        scorers = {f"layer{layer + 1}": match(boundaries[:, :, layer], gaps) for layer in range(layers)}
        scorers["every_char"] = match(every, gaps)
        scorers |= {f"random_layer{layer + 1}": match(randoms[layer], gaps) for layer in range(layers)}
        if surprisal is not None:
            scorers[SURPRISAL_PEAK] = match(surprisal_peaks(surprisal), gaps)
        matches[name] = scorers
    return BoundaryStats(acts, matches)


# ---- one text ----------------------------------------------------------------------------------------------------


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


# ---- the figure --------------------------------------------------------------------------------------------------

# Layout in pixels at DPI dots per inch, so that the PNG's size is exactly what figure_size says.
DPI = 100
CELL = 14  # one symbol
ROW = 24  # one layer
LEFT, RIGHT, TOP, BOTTOM = 90, 30, 60, 10
LABELS = 26  # the characters under a panel
GAP = 26  # between a block's two panels (room for the panel's title)
BLOCK_GAP = 30  # between the blocks of a wrapped text


def _block_height(layers: int) -> int:
    """One block: the boundary panel (L-1 rows), its characters, the gate panel (L rows), its characters."""
    return (layers - 1) * ROW + LABELS + GAP + layers * ROW + LABELS


def row_length(symbols: int, wrap: int) -> int:
    """Symbols per row when `symbols` are wrapped at `wrap`: rows of even length, so no short stub is left over."""
    return math.ceil(symbols / max(1, math.ceil(symbols / wrap)))


def figure_size(symbols: int, layers: int, wrap: int = 100) -> tuple[int, int]:
    """(width, height) in pixels of the figure of `symbols` positions of an L-layer model, wrapped at `wrap`."""
    per_row = row_length(symbols, wrap)
    blocks = math.ceil(symbols / per_row)
    width = LEFT + per_row * CELL + RIGHT
    height = TOP + blocks * _block_height(layers) + (blocks - 1) * BLOCK_GAP + BOTTOM
    return width, height


def check_figure_args(path: Path | None, wrap: int) -> None:
    """UserErrors for a figure that cannot be drawn as asked, raised before any work."""
    if path is not None and path.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, not {path}")
    if wrap < 10:
        raise UserError(f"--wrap must be at least 10 symbols, not {wrap}")


def draw(result: TextBoundaries, path: Path, wrap: int = 100, title: str = "") -> tuple[int, int]:
    """Draw the boundaries and the gates over the text into a PNG at `path`, written atomically (a temporary file,
    then a rename). Returns the image's (width, height) in pixels."""
    from matplotlib.figure import Figure  # imported here: matplotlib takes a while, and only the figure needs it

    check_figure_args(path, wrap)
    symbols, layers = len(result.symbols), result.gates.shape[1]
    width, height = figure_size(symbols, layers, wrap)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    if title:
        fig.text(LEFT / width, 1 - 14 / height, title, fontsize=11, va="top")
    glyphs = [glyph(s) for s in result.symbols]
    panels = (
        (result.boundaries, "Greys", layers - 1, "boundary z: black where the layer closes a segment"),
        (result.gates, "Blues", layers, "output gate g: white 0 to blue 1"),
    )
    per_row = row_length(symbols, wrap)
    for block, start in enumerate(range(0, symbols, per_row)):
        stop = min(start + per_row, symbols)
        top = TOP + block * (_block_height(layers) + BLOCK_GAP)  # pixels from the top of the figure
        for values, cmap, rows, label in panels:
            ax = fig.add_axes(((LEFT) / width, 1 - (top + rows * ROW) / height, (stop - start) * CELL / width,
                               rows * ROW / height))  # fmt: skip
            # origin lower: layer 1 at the bottom, next to the text, as the hierarchy grows upward
            ax.imshow(values[start:stop].T, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower",
                      interpolation="nearest")  # fmt: skip
            # Baseline-aligned, or each character would hang from its own top and the text would wobble.
            ax.set_xticks(range(stop - start), glyphs[start:stop], family="DejaVu Sans Mono", fontsize=9, va="baseline")
            ax.tick_params(axis="x", pad=12)
            ax.set_yticks(range(rows), [f"layer {i + 1}" for i in range(rows)], fontsize=8)
            ax.set_xticks(np.arange(stop - start - 1) + 0.5, minor=True)
            ax.set_yticks(np.arange(rows - 1) + 0.5, minor=True)
            ax.grid(which="minor", color="0.8", linewidth=0.5)
            ax.tick_params(which="both", length=0)
            if block == 0:
                ax.set_title(label, fontsize=9, loc="left")
            top += rows * ROW + LABELS + GAP
    _save_png(fig, path)
    return width, height


def _save_png(fig: object, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half an image."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(fd, "wb") as file:
            fig.savefig(file, format="png", dpi=DPI)  # type: ignore[attr-defined]
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an image is as readable as any new file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
