"""Training batches for truncated BPTT: contiguous streams, so the recurrent state can carry across batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from hmlm.errors import UserError


class StreamBatcher:
    """Cut a split into batch_size contiguous streams (batchify, as pytorch/examples word_language_model); a
    batch is the next seq_len tokens of every stream, the target the same window shifted by one; the caller
    carries the recurrent state across batches.

    With n = len(tokens) // batch_size, stream s is tokens[s*n : (s+1)*n] (the last len % batch_size tokens
    are dropped). Batch k holds x = streams[:, k*seq_len : k*seq_len + T] and y = the same shifted by one, with
    T = seq_len except for a shorter last batch, so an epoch predicts each of the n - 1 following tokens of
    every stream exactly once.

    With world_size > 1 (torchrun), batch_size is the global batch: rank r keeps streams [r*b, (r+1)*b),
    b = batch_size // world_size, so the ranks together see exactly the batches of a single process.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or seq_len < 1:
            raise UserError(f"batch_size and seq_len must be at least 1, not {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is not one of the {world_size} processes")
        if batch_size % world_size:
            raise UserError(
                f"batch_size {batch_size} is not divisible by the {world_size} processes: "
                "it is the global batch, split evenly between them"
            )
        stream_len = len(tokens) // batch_size
        if stream_len < 2:
            raise UserError(
                f"a split of {len(tokens):,} tokens is too short for batch_size {batch_size}: each stream needs "
                f"at least 2 tokens ({2 * batch_size:,} in all); use a smaller batch_size"
            )
        self.batch_size = batch_size  # global
        self.seq_len = seq_len
        self.streams = batch_size // world_size  # local: the rows of every batch this process sees
        self.stream_len = stream_len
        # (streams, stream_len): a view, so a memory-mapped split is read batch by batch, never all at once
        self.data = tokens[: batch_size * stream_len].reshape(batch_size, stream_len)[
            rank * self.streams : (rank + 1) * self.streams
        ]
        self.position = 0  # index of the next batch

    def __len__(self) -> int:
        """Batches per epoch (the last one may be shorter than seq_len)."""
        return -(-(self.stream_len - 1) // self.seq_len)

    @property
    def tokens_per_batch(self) -> int:
        """Predicted tokens in a full batch of this process."""
        return self.streams * self.seq_len

    @property
    def tokens_per_epoch(self) -> int:
        """Predicted tokens in one epoch of this process (each stream's first token is never a target)."""
        return self.streams * (self.stream_len - 1)

    def span(self, index: int) -> tuple[int, int]:
        """The columns of batch `index`: x = streams[:, start:stop], y = streams[:, start + 1 : stop + 1]."""
        start = index * self.seq_len
        return start, min(start + self.seq_len, self.stream_len - 1)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of the epoch: (x, y), int64, (streams, T)."""
        start, stop = self.span(index)
        # np.array copies into a plain contiguous int64 array (from a memmap, too): (streams, T) each
        x = torch.from_numpy(np.array(self.data[:, start:stop], dtype=np.int64))
        y = torch.from_numpy(np.array(self.data[:, start + 1 : stop + 1], dtype=np.int64))
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """From the current position to the end of the epoch. The position moves on as each batch is handed
        out, so a checkpoint taken while batch k is being used resumes at k + 1; after the last batch it is 0."""
        for index in range(self.position, len(self)):
            self.position = (index + 1) % len(self)
            yield self.batch(index)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, d: dict) -> None:
        position = int(d["position"])
        if not 0 <= position < len(self):
            raise UserError(
                f"the saved data position {position} is outside this split's {len(self)} batches: "
                "resume with the batch_size and seq_len the run started with"
            )
        self.position = position
