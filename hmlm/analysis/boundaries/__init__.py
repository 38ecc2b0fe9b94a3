"""Where each layer's boundary detector closes a segment: statistics and scores against word boundaries
(`metrics.py`), one text read through a model (`reading.py`), and its figure (`drawing.py`).

Imports point one way: drawing -> reading -> metrics. The names other modules use are re-exported here.
"""

from hmlm.analysis.boundaries.drawing import check_figure_args, draw
from hmlm.analysis.boundaries.metrics import BoundaryStats, score, split_references
from hmlm.analysis.boundaries.reading import TextBoundaries, read_text, require_boundaries

__all__ = [
    "BoundaryStats",
    "TextBoundaries",
    "check_figure_args",
    "draw",
    "read_text",
    "require_boundaries",
    "score",
    "split_references",
]
