"""Bits per character: the mean over predicted tokens of -log2 p(token | everything before it in its stream).

The split is cut into contiguous streams (the same batchify as training) and the recurrent state is carried
across the whole split, so every prediction sees its full history. No autograd state is kept. The split goes to
the device once and the batches are slices of it there, so on a GPU nothing waits for the host until the end.
Given reference boundaries, the same pass scores each layer's boundaries against them (hmlm/analysis/boundaries/), and
it always finds the streams that locked into their highest layer firing on every step (hmlm/analysis/locks.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from hmlm.analysis.boundaries.metrics import BoundaryStats, score
from hmlm.analysis.locks import Locks, LockWatch
from hmlm.data import StreamBatcher
from hmlm.graphs import capture_eval, eval_forward
from hmlm.model import CharLM

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood in nats
    tokens: int  # predicted tokens
    boundary_rate: list[float] = field(default_factory=list)  # per lower layer: fraction of steps with z = 1
    boundary_stats: BoundaryStats | None = None  # with `references` and a model that has boundaries
    locks: Locks | None = None  # the streams locked into their highest layer firing on every step

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)


@torch.no_grad()
def evaluate(
    model: CharLM,
    tokens: np.ndarray,
    batch_size: int = 64,
    seq_len: int = 100,
    device: torch.device | str = "cpu",
    max_tokens: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: ReduceSum | None = None,
    autocast: bool = False,
    progress: bool = False,
    references: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    cuda_graph: str = "auto",
) -> EvalResult:
    """BPC of `model` on `tokens`. With several processes, each takes its own streams and `reduce_sum` adds
    the sums over processes, so every token is counted exactly once.

    `references` ({name: (len(tokens),) bool gaps}, from hmlm.analysis.boundaries.split_references) asks for the
    boundary statistics too: every position's z is kept (L-1 floats per token) and scored at the end, stream by stream,
    with the random baseline seeded by `seed`.

    On CUDA the forward of a full batch is captured once as a CUDA graph and replayed (`cuda_graph`: auto, on, off;
    see hmlm/training/cuda_graph.py); a shorter last batch runs eagerly."""
    if max_tokens:
        tokens = tokens[: max_tokens + batch_size]  # + batch_size: every stream loses its first token as input
    batcher = StreamBatcher(tokens, batch_size, seq_len, rank, world_size)
    kept: list[torch.Tensor] = []  # (B, T, L-1) per batch, when scoring boundaries
    kept_surprisal: list[torch.Tensor] = []  # (B, T) -log p of each next symbol, for the surprisal-peak baseline
    was_training = model.training
    model.eval()
    device = torch.device(device)
    cast = torch.bfloat16 if autocast else None
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    boundary_sum = None
    watch = LockWatch()
    state = None
    graph = None
    if device.type == "cuda" and len(batcher):
        first = batcher.batch(0)
        graph = capture_eval(model, tuple(first[0].shape), device, cast, cuda_graph, first)
    batches = device_batches(batcher, device)
    for x, y in tqdm(batches, total=len(batcher), desc="eval", leave=False, disable=not progress, unit="batch"):
        if graph is not None and tuple(x.shape) == graph.batch_shape:
            batch = graph.run(x, y, state)  # its outputs live in the graph's buffers until the next replay
        else:
            batch = eval_forward(model, x, y, state, cast)
        state = batch.state
        loss_sum += batch.nll
        count += y.numel()
        rates = batch.boundary_sum  # (L-1,)
        boundary_sum = rates.clone() if boundary_sum is None else boundary_sum + rates
        watch.add(batch.boundaries, batch.losses)
        if references is not None:
            kept.append(batch.boundaries.to(torch.float32, copy=True))
            kept_surprisal.append(batch.losses.clone())  # a replayed graph overwrites its buffers
    if boundary_sum is None:
        boundary_sum = torch.zeros(0, dtype=torch.float64, device=device)
    if reduce_sum is not None:
        loss_sum, count, boundary_sum = reduce_sum(loss_sum), reduce_sum(count), reduce_sum(boundary_sum)
    model.train(was_training)
    stats = None
    if references is not None and boundary_sum.numel():
        surprisal = torch.cat(kept_surprisal, dim=1)
        stats = _score_streams(torch.cat(kept, dim=1), references, tokens, batch_size, seq_len, rank, world_size, seed,
                               surprisal)  # fmt: skip
        if reduce_sum is not None:
            numbers = reduce_sum(torch.tensor(stats.numbers(), dtype=torch.float64, device=device))
            stats = stats.with_numbers(numbers.tolist())
    locks = watch.result(reduce_sum)
    n = max(count.item(), 1.0)
    rate = (boundary_sum / n).tolist()
    return EvalResult(loss=loss_sum.item() / n, tokens=int(count.item()), boundary_rate=rate, boundary_stats=stats,
                      locks=locks)  # fmt: skip


def device_batches(batcher: StreamBatcher, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of one pass over `batcher`, sliced on `device` from its streams copied there once (int64,
    8 bytes a token: 40 MB for enwik8's 5M-symbol test split): no copy and no wait per batch."""
    streams = torch.from_numpy(np.asarray(batcher.data, dtype=np.int64)).to(device)  # (streams, n)
    for index in range(len(batcher)):
        start, stop = batcher.span(index)
        yield streams[:, start:stop], streams[:, start + 1 : stop + 1]  # (streams, T) each


def _score_streams(
    boundaries: torch.Tensor,
    references: Mapping[str, np.ndarray],
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    rank: int,
    world_size: int,
    seed: int,
    surprisal: torch.Tensor | None = None,
) -> BoundaryStats:
    """Score this process's boundaries (streams, n - 1, L-1) against the references cut into the same streams.

    Stream s covers tokens[s*n : (s+1)*n]; its inputs are positions 0..n-2, whose predictions reach the gaps
    0..n-1: the stream's whole row of gaps."""
    gaps = {}
    for name, ref in references.items():
        if len(ref) < len(tokens):
            raise ValueError(f"reference {name!r} has {len(ref)} positions for {len(tokens)} tokens")
        # A second batcher over the labels lays them out exactly as the tokens: (streams, n)
        gaps[name] = StreamBatcher(ref[: len(tokens)], batch_size, seq_len, rank, world_size).data
    # Each process draws its own random baseline: seeded by rank too, so processes do not repeat one another.
    peaks = surprisal.double().cpu().numpy() if surprisal is not None else None  # (streams, n - 1)
    return score(boundaries.cpu().numpy(), gaps, seed + 1000003 * rank, peaks)
