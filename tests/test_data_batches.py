"""StreamBatcher: contiguous streams, shifted targets, resumable position, rank slicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmlm.data import StreamBatcher
from hmlm.errors import UserError

TOKENS = np.arange(1003, dtype=np.int64) % 251  # distinct neighbours, an odd length


def test_shapes_targets_and_length() -> None:
    batcher = StreamBatcher(TOKENS, batch_size=4, seq_len=30)
    n = len(TOKENS) // 4  # 250 tokens per stream, 249 predicted
    assert batcher.stream_len == n and len(batcher) == 9  # 8 full batches of 30, then 9
    batches = list(batcher)
    assert [tuple(x.shape) for x, _ in batches] == [(4, 30)] * 8 + [(4, 9)]
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.is_contiguous() and y.is_contiguous()
    assert batcher.tokens_per_epoch == sum(y.numel() for _, y in batches) == 4 * (n - 1)


def test_each_row_is_one_contiguous_stream_and_targets_are_the_next_tokens() -> None:
    batcher = StreamBatcher(TOKENS, batch_size=4, seq_len=30)
    xs, ys = zip(*batcher, strict=True)
    x, y = torch.cat(xs, dim=1), torch.cat(ys, dim=1)  # (4, 249) each: the whole epoch
    streams = torch.from_numpy(TOKENS[:1000].reshape(4, 250))
    assert torch.equal(x, streams[:, :-1])
    assert torch.equal(y, streams[:, 1:])


def test_position_moves_with_each_batch_and_wraps_to_a_new_epoch() -> None:
    batcher = StreamBatcher(TOKENS, batch_size=4, seq_len=100)  # 3 batches
    iterator = iter(batcher)
    next(iterator)
    assert batcher.position == 1 and batcher.state_dict() == {"position": 1}
    rest = list(iterator)
    assert len(rest) == 2 and batcher.position == 0
    assert len(list(batcher)) == 3  # the next iter() is a whole epoch


def test_resume_from_state_dict_gives_the_same_batches() -> None:
    whole = [x for x, _ in StreamBatcher(TOKENS, batch_size=2, seq_len=50)]
    first = StreamBatcher(TOKENS, batch_size=2, seq_len=50)
    seen = []
    for x, _ in first:
        seen.append(x)
        if len(seen) == 4:
            break
    state = first.state_dict()
    resumed = StreamBatcher(TOKENS, batch_size=2, seq_len=50)
    resumed.load_state_dict(state)
    seen += [x for x, _ in resumed]
    assert len(seen) == len(whole) and all(torch.equal(a, b) for a, b in zip(seen, whole, strict=True))


def test_ranks_split_the_global_batch_between_them() -> None:
    whole = StreamBatcher(TOKENS, batch_size=6, seq_len=40)
    parts = [StreamBatcher(TOKENS, batch_size=6, seq_len=40, rank=r, world_size=3) for r in range(3)]
    assert all(len(p) == len(whole) and p.streams == 2 for p in parts)
    for batch, *shards in zip(whole, *parts, strict=True):
        assert torch.equal(batch[0], torch.cat([x for x, _ in shards]))
        assert torch.equal(batch[1], torch.cat([y for _, y in shards]))


def test_a_memory_mapped_split_works(tmp_path) -> None:
    path = tmp_path / "train.bin"
    TOKENS.astype(np.uint8).tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=(len(TOKENS),))
    x, y = next(iter(StreamBatcher(mapped, batch_size=4, seq_len=10)))
    assert x.dtype == torch.int64 and torch.equal(x[1], torch.from_numpy(TOKENS[250:260]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 6, "world_size": 4}, "not divisible by the 4 processes"),
        ({"batch_size": 600}, "too short for batch_size 600"),
        ({"batch_size": 4, "rank": 2, "world_size": 2}, "rank 2 is not one of the 2 processes"),
        ({"batch_size": 0}, "at least 1"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        StreamBatcher(TOKENS, seq_len=10, **kwargs)


def test_a_position_past_the_end_cannot_be_loaded() -> None:
    batcher = StreamBatcher(TOKENS, batch_size=4, seq_len=100)
    with pytest.raises(UserError, match="outside this split's 3 batches"):
        batcher.load_state_dict({"position": 3})
