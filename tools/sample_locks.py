"""Whether samples lock: each layer's firing rate over the last 200 steps of samples drawn with several seeds.

    .venv/bin/python tools/sample_locks.py runs/ptb [--seeds 10] [--length 500] [--prompt "the company"]

Draws one sample per seed as `hmlm sample RUN --prompt P --length N --seed S` draws it (from the zero state, the
prompt read first) and prints, per seed, each boundary layer's rate over the sample's last 200 steps; a rate above
0.9 is a lock (hmlm/analysis/locks.py).
"""

from __future__ import annotations

import argparse

import torch
from study_run import open_run

from hmlm.analysis.locks import LOCK_RATE, LOCK_TAIL, LockWatch
from hmlm.analysis.sample import generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--prompt", default="the company")
    args, trained, _ = open_run(parser)
    worst = 0.0
    for seed in range(args.seeds):
        watch = LockWatch()
        text = "".join(generate(trained.model, trained.vocab, args.prompt, args.length,
                                generator=torch.Generator().manual_seed(seed), watch=watch))  # fmt: skip
        rates = watch.tail_rates()[0].tolist()
        worst = max(worst, *rates)
        print(f"seed {seed}: last {LOCK_TAIL} steps, rate per layer " + " ".join(f"{r:.3f}" for r in rates)
              + f"; {text[-60:]!r}")  # fmt: skip
    print(f"highest rate of any layer in any sample: {worst:.3f} ({'locked' if worst > LOCK_RATE else 'no lock'})")


if __name__ == "__main__":
    main()
