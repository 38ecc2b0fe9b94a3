"""Why a stream locks: the highest boundary layer's detector, term by term, in locked and in healthy streams.

    .venv/bin/python tools/lock_anatomy.py runs/ptb [--split valid] [--streams 64] [--symbols 64000]

Reads the first `symbols` of the split as `streams` streams from the zero state, as evaluation does, one step at
a time, and splits the pre-activation of layer l = L-1's boundary detector (never layer-normalized) into its terms:

    zhat^l_t = W_z h^{l-1}_t z^{l-1}_t          bottom-up
             + U_z h^l_{t-1}                    recurrent
             + U_z^td h^{l+1}_{t-1} z^l_{t-1}   top-down, present only right after a boundary
             + b_z

It prints, for the locked streams (hmlm/analysis/locks.py) and the others: the mean of each term over the streams' last
200 steps, each layer's firing rate there, and the norm of the top layer's cell; then the first steps of the first
locked stream (or of stream 0, where none locked). The docs' "Locked streams" section reads these figures.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from study_run import open_run

from hmlm.analysis.locks import LOCK_TAIL, locked_rows


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--symbols", type=int, default=64_000)
    parser.add_argument("--first", type=int, default=12, help="steps of the first locked stream to print")
    args, trained, tokens = open_run(parser)
    model = trained.model.eval()
    rnn = model.rnn
    L = len(rnn.hidden_sizes)
    layer = L - 2  # 0-based: the highest layer with a boundary detector
    H, below = rnn.hidden_sizes[layer], rnn.below_sizes[layer]
    row, bias = rnn.weight[layer][4 * H], float(rnn.bias[layer][4 * H])
    w_below, u_rec, u_above = row[:below], row[below : below + H], row[below + H :]

    n = min(args.symbols, len(tokens) - 1) // args.streams
    x = torch.from_numpy(np.asarray(tokens[: n * args.streams], dtype=np.int64)).view(args.streams, n)  # (S, P)
    terms = torch.zeros(4, args.streams, n)  # bottom-up, recurrent, top-down, zhat
    fired = torch.zeros(L - 1, args.streams, n)
    top_cell = torch.zeros(args.streams, n)
    state = None
    for t in range(n):
        before = state
        out = model(x[:, t : t + 1], state)
        state = out.state
        h_below, z_below = state.h[layer - 1] if layer else None, state.z[layer - 1] if layer else None
        h_prev = before.h[layer] if before is not None else torch.zeros_like(state.h[layer])
        z_prev = before.z[layer] if before is not None else torch.zeros_like(state.z[layer])
        above_prev = before.h[layer + 1] if before is not None else torch.zeros_like(state.h[layer + 1])
        bottom = (h_below @ w_below) * z_below[:, 0] if h_below is not None else torch.zeros(args.streams)
        recurrent = h_prev @ u_rec
        top_down = (above_prev @ u_above) * z_prev[:, 0]
        terms[:, :, t] = torch.stack([bottom, recurrent, top_down, bottom + recurrent + top_down + bias])
        fired[:, :, t] = out.boundaries[:, 0].t()
        top_cell[:, t] = state.c[L - 1].norm(dim=1)

    locked = locked_rows(fired[-1])
    print(f"{int(locked.sum())} of {args.streams} streams of {n} symbols locked; detector bias b_z = {bias:+.3f}")
    tail = slice(max(0, n - LOCK_TAIL), n)
    for name, rows in (("locked", locked), ("healthy", ~locked)):
        if not rows.any():
            continue
        mean = [float(terms[i][rows][:, tail].mean()) for i in range(4)]
        rates = [float(fired[i][rows][:, tail].mean()) for i in range(L - 1)]
        print(f"{name}: zhat^{layer + 1} {mean[3]:+.3f} = bottom-up {mean[0]:+.3f} + recurrent {mean[1]:+.3f} "
              f"+ top-down {mean[2]:+.3f} + bias; rates " + " ".join(f"z{i + 1} {r:.3f}" for i, r in enumerate(rates))
              + f"; |c^{L}| {float(top_cell[rows][:, tail].mean()):.2f}")  # fmt: skip
    s = int(locked.nonzero()[0]) if locked.any() else 0  # the first locked stream, else the first
    print(f"stream {s} from the zero state (t: zhat^{layer + 1} = bottom-up + recurrent + top-down + bias; z):")
    for t in range(min(args.first, n)):
        b, r, d, zhat = (float(terms[i, s, t]) for i in range(4))
        zs = " ".join(str(int(fired[i, s, t])) for i in range(L - 1))
        print(f"  {t:3d}: {zhat:+.3f} = {b:+.3f} {r:+.3f} {d:+.3f} {bias:+.3f}; z {zs}; |c^{L}| "
              f"{float(top_cell[s, t]):.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
