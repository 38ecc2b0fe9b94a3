"""On which symbols each boundary layer of a trained HM-LSTM fires: for every symbol, the fraction of its
occurrences on which the layer closes a segment (z = 1), over the start of a split read as one stream.

    .venv/bin/python tools/firing_symbols.py runs/study/prior1sample-s1 [--split test] [--symbols 20000]

A layer that has learned words fires on the symbol that ends each word or on the space after it;
docs/boundary-study.md has what it found.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from study_run import open_run

SHOWN = 0.005  # symbols listed: those at least this fraction of the positions, the most frequent first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=20_000)
    args, trained, tokens = open_run(parser)
    model, vocab = trained.model, trained.vocab
    ids = tokens[: args.symbols].astype(np.int64)
    with torch.no_grad():
        z = model(torch.from_numpy(ids)[None]).boundaries[0].numpy() > 0.5  # (T, L-1)
    symbols, counts = np.unique(ids, return_counts=True)
    order = [s for s, c in sorted(zip(symbols, counts, strict=True), key=lambda sc: -sc[1]) if c >= SHOWN * len(ids)]
    for layer in range(z.shape[1]):
        fired = z[:, layer]
        cells = [f"{vocab.decode([int(s)])!r} {fired[ids == s].mean():.2f}" for s in order]
        print(f"layer {layer + 1} (rate {fired.mean():.3f}): " + ", ".join(cells))


if __name__ == "__main__":
    main()
