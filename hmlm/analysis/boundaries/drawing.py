"""The figure of one text, like Figure 3 of the paper: the boundaries z and the output gates g over the text."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from hmlm.analysis.boundaries.reading import TextBoundaries, glyph, row_length
from hmlm.errors import UserError

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
