"""How a trained HM-LSTM copes with streams that start from the zero state, as every evaluation's streams do.

    .venv/bin/python tools/fresh_starts.py runs/ptb-study/sample-s0 [--split test] [--streams 64] [--symbols 64000]

Cuts the first `symbols` of the split into `streams` contiguous streams and reads them twice: from the zero state
(what `hmlm eval` does), and with every stream starting from the state in which the first pass left stream 0 (a
"warm" start: the model has been reading text for a while). It prints the BPC of both, and the streams that are
"locked": whose highest boundary layer fires on more than 90% of their last 200 steps. README, "Boundary study",
has what it found.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from study_run import open_run
from torch import Tensor

from hmlm.cuda_graph import eval_forward
from hmlm.model import CharLM, HMLSTMState

SEGMENT = 100  # symbols per forward call, the state carried between calls
LOCKED_RATE = 0.9  # a stream whose top boundary layer fires more often than this at its end is locked
TAIL = 200  # the last steps of a stream over which that rate is taken


@torch.no_grad()
def read(model: CharLM, x: Tensor, y: Tensor, state: HMLSTMState | None) -> tuple[Tensor, Tensor, HMLSTMState]:
    """Per-symbol bits (S, P), boundaries (S, P, L-1) and the final state of streams x, y (S, P), read as
    evaluation reads a batch (hmlm.cuda_graph.eval_forward)."""
    bits, boundaries = [], []
    for start in range(0, x.shape[1], SEGMENT):
        batch = eval_forward(model, x[:, start : start + SEGMENT], y[:, start : start + SEGMENT], state, None)
        state = batch.state
        bits.append(batch.losses / math.log(2))
        boundaries.append(batch.boundaries)
    return torch.cat(bits, 1), torch.cat(boundaries, 1), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--symbols", type=int, default=64_000)
    args, trained, tokens = open_run(parser)
    model = trained.model
    n = min(args.symbols, len(tokens) - 1) // args.streams * args.streams
    data = torch.from_numpy(np.asarray(tokens[: n + 1], dtype=np.int64))
    x, y = data[:n].view(args.streams, -1), data[1 : n + 1].view(args.streams, -1)  # (S, P)
    cold_bits, cold_z, final = read(model, x, y, None)
    warm = HMLSTMState(*[[t[:1].expand_as(t).clone() for t in part] for part in final])  # stream 0's state for all
    warm_bits, warm_z, _ = read(model, x, y, warm)
    for name, bits, z in (("zero state", cold_bits, cold_z), ("warm state", warm_bits, warm_z)):
        locked = (z[:, -TAIL:, -1].mean(1) > LOCKED_RATE).nonzero().flatten().tolist()
        print(f"{name}: {bits.mean():.3f} bpc over {args.streams} streams of {x.shape[1]} symbols; locked streams: "
              f"{len(locked)} {locked if locked else ''}; their bpc: "
              f"{bits[locked].mean().item() if locked else float('nan'):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
