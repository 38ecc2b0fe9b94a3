"""What each layer's boundary detector learns: statistics and scores against word (and phrase) boundaries.

A lower layer l < L closes a segment at step t when z^l_t = 1 (docs/design.md, "The model"). This module measures

- each layer's firing rate (the mean of z; soft boundaries count with their value) and its mean segment length
  (symbols per closed segment: z = 1 thresholded at 0.5, the first segment starting with the text);
- precision, recall and F1 of each layer's boundaries against reference boundaries, with three baselines: a
  boundary after every symbol, random boundaries at the layer's own rate (seeded), and boundaries where the
  model's own surprisal of the next symbol peaks (the classic cue of unsupervised word segmentation: position t
  when -log p(x_{t+1} | x_<=t) is larger than at both neighbours, or than the one neighbour at a stream's edge);

reading.py reads a text through a model and drawing.py draws it, like Figure 3 of the paper
(`hmlm boundaries RUN --text ...`).

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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hmlm.data import Dataset

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
    on_copy: int = 0  # boundaries opened on a step where the layer copied (only the seed's cell can: hmlm/cell.py)

    @property
    def rate(self) -> float:
        return self.fired / self.positions if self.positions else 0.0

    @property
    def mean_segment(self) -> float | None:
        """Symbols per closed segment; None when the layer never fired."""
        return self.closed / self.boundaries if self.boundaries else None

    @property
    def on_copy_share(self) -> float | None:
        """The share of the boundaries opened on a COPY step; None when the layer never fired."""
        return self.on_copy / self.boundaries if self.boundaries else None


def activity(z: np.ndarray, z_below: np.ndarray | None = None) -> Activity:
    """z: (S, P) one layer's boundaries, every stream starting from a fresh state; z_below the layer below's (None
    for layer 1, which never copies). A step copies where z^l_{t-1} and z^{l-1}_t are both off (thresholded)."""
    fired = z > THRESHOLD
    last = np.where(fired.any(axis=1), z.shape[1] - np.argmax(fired[:, ::-1], axis=1), 0)  # (S,) last boundary + 1
    on_copy = 0
    if z_below is not None:
        fired_before = np.pad(fired[:, :-1], ((0, 0), (1, 0)))  # z^l_{t-1}, off before a fresh state's first step
        on_copy = int((fired & ~fired_before & (z_below <= THRESHOLD)).sum())
    return Activity(int(z.size), float(z.sum(dtype=np.float64)), int(fired.sum()), int(last.sum()), on_copy)


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
            if layer > 1:
                out[f"boundary_on_copy_layer{layer}"] = act.on_copy_share
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
    below = [None, *(boundaries[:, :, layer] for layer in range(layers - 1))]  # layer 1 never copies
    acts = [activity(boundaries[:, :, layer], below[layer]) for layer in range(layers)]
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
