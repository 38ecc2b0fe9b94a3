"""How noisy the validation figure is that the learning-rate rule reads: one checkpoint on disjoint slices.

    .venv/bin/python tools/valid_noise.py runs/ptb [--split valid] [--slice 100000] [--streams 32]

Cuts the split into disjoint slices of `slice` symbols and reads each as evaluation reads it during training
(`streams` contiguous streams from the zero state), and again from a warm state (every stream starting from the
state in which the first pass left stream 0; hmlm/analysis/locks.py). It prints each slice's BPC, their mean and
standard deviation, and what that makes the standard error of a figure over the whole split. The docs' "Locked streams"
section compares these with the improvement between two evaluations.
"""

from __future__ import annotations

import argparse
import math
import statistics

from study_run import open_run

from hmlm.analysis.locks import fresh_starts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", type=int, default=100_000)
    parser.add_argument("--streams", type=int, default=32)
    args, trained, tokens = open_run(parser)
    seq_len = trained.config.train.seq_len
    zero, warm, locked = [], [], 0
    for start in range(0, len(tokens) - args.slice, args.slice):
        part = tokens[start : start + args.slice + 1]
        check = fresh_starts(trained.model, part, args.streams, args.slice, seq_len)
        zero.append(check.zero_bpc)
        warm.append(check.warm_bpc)
        locked += check.zero.locked
        print(f"slice {len(zero)} (symbols {start:,}-{start + args.slice:,}): zero state {check.zero_bpc:.4f}, "
              f"warm {check.warm_bpc:.4f}, locked streams {check.zero.locked}")  # fmt: skip
    slices = len(zero)
    for name, values in (("zero state", zero), ("warm state", warm)):
        sd = statistics.stdev(values)
        print(f"{name}: mean {statistics.mean(values):.4f}, sd over {slices} slices of {args.slice:,} {sd:.4f}; "
              f"standard error of the whole split about {sd / math.sqrt(slices):.4f}")  # fmt: skip
    gaps = [w - z for z, w in zip(zero, warm, strict=True)]
    print(f"warm minus zero per slice: mean {statistics.mean(gaps):+.4f}, largest {max(gaps, key=abs):+.4f}; "
          f"locked streams in all: {locked}")  # fmt: skip


if __name__ == "__main__":
    main()
