"""What the study tools share: a trained HM-LSTM run and a split of its dataset, from the command line."""

from __future__ import annotations

import argparse

import numpy as np

from hmlm.analysis.boundaries import require_boundaries
from hmlm.checkpoint import Trained, load_trained
from hmlm.data import open_dataset
from hmlm.errors import UserError


def open_run(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, Trained, np.ndarray]:
    """Parse RUN, --split and --checkpoint (and the parser's own options); the trained run (an HM-LSTM with
    boundaries) and the split's tokens. A bad run exits 2 with one line, as hmlm's commands do."""
    parser.add_argument("run", help="a run directory (runs/NAME) or a checkpoint file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--checkpoint", default="best", help="best or last")
    args = parser.parse_args()
    try:
        trained = load_trained(args.run, args.checkpoint)
        require_boundaries(trained.model)
        tokens = open_dataset(trained.config.data.name, trained.config.data.dir).split(args.split)
    except UserError as error:
        parser.exit(2, f"error: {error}\n")
    return args, trained, np.asarray(tokens)
