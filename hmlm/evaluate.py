"""Bits per character: the mean over predicted tokens of -log2 p(token | everything before it in its stream).

The split is cut into contiguous streams (the same batchify as training) and the recurrent state is carried
across the whole split, so every prediction sees its full history. No autograd state is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hmlm.data import StreamBatcher
from hmlm.model import CharLM

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    loss: float  # mean negative log-likelihood in nats
    tokens: int  # predicted tokens
    boundary_rate: list[float] = field(default_factory=list)  # per lower layer: fraction of steps with z = 1

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
) -> EvalResult:
    """BPC of `model` on `tokens`. With several processes, each takes its own streams and `reduce_sum` adds
    the sums over processes, so every token is counted exactly once."""
    if max_tokens:
        tokens = tokens[: max_tokens + batch_size]  # + batch_size: every stream loses its first token as input
    batcher = StreamBatcher(tokens, batch_size, seq_len, rank, world_size)
    was_training = model.training
    model.eval()
    device = torch.device(device)
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else nullcontext()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    boundary_sum = None
    state = None
    for x, y in tqdm(batcher, desc="eval", leave=False, disable=not progress, unit="batch"):
        x, y = x.to(device), y.to(device)
        with cast:
            out = model(x, state)
        state = out.state
        loss_sum += F.cross_entropy(out.logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
        count += y.numel()
        rates = out.boundaries.double().sum(dim=(0, 1))  # (L-1,)
        boundary_sum = rates if boundary_sum is None else boundary_sum + rates
    if boundary_sum is None:
        boundary_sum = torch.zeros(0, dtype=torch.float64, device=device)
    if reduce_sum is not None:
        loss_sum, count, boundary_sum = reduce_sum(loss_sum), reduce_sum(count), reduce_sum(boundary_sum)
    model.train(was_training)
    n = max(count.item(), 1.0)
    return EvalResult(loss=loss_sum.item() / n, tokens=int(count.item()), boundary_rate=(boundary_sum / n).tolist())
