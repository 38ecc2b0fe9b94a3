"""How a trained HM-LSTM copes with streams that start from the zero state, as every evaluation's streams do.

    .venv/bin/python tools/fresh_starts.py runs/ptb [--split test] [--streams 64] [--symbols 64000]

Cuts the first `symbols` of the split into `streams` contiguous streams and reads them twice: from the zero state
(what `hmlm eval` does), and with every stream starting from the state in which the first pass left the first
stream that did not lock (a "warm" start: the model has been reading text for a while). It prints the BPC of both,
and the streams that are "locked": whose highest boundary layer fires on more than 90% of their last 200 steps
(hmlm/analysis/locks.py).
"""

from __future__ import annotations

import argparse
import math

from study_run import open_run

from hmlm.analysis.locks import Locks, fresh_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--symbols", type=int, default=64_000)
    args, trained, tokens = open_run(parser)
    result = fresh_starts(trained.model, tokens, args.streams, args.symbols, trained.config.train.seq_len)
    length = min(args.symbols, len(tokens) - 1) // args.streams
    for name, bpc, locks in (
        ("zero state", result.zero_bpc, result.zero),
        ("warm state", result.warm_bpc, result.warm),
    ):
        print(f"{name}: {bpc:.3f} bpc over {args.streams} streams of {length} symbols; locked streams: "
              f"{locks.locked}; their bpc: {_bpc(locks):.2f}")  # fmt: skip


def _bpc(locks: Locks) -> float:
    return locks.bpc if locks.bpc is not None else math.nan


if __name__ == "__main__":
    main()
