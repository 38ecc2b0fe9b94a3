"""Turn raw codes (bytes or Unicode code points) into token ids and a sorted vocabulary, with numpy.

A 100 MB file is 100 million codes, so there is no Python loop over them: the vocabulary is the set of codes
with a non-zero count (np.bincount) and the ids come from one lookup table (np.take). Both run over chunks of
a million codes: bincount converts its input to 64-bit integers, and on a whole 100 MB array that copy alone
is 800 MB and takes seconds; a chunk stays in cache, which is about fifteen times faster.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from hmlm.data.vocab import Vocab
from hmlm.errors import UserError

CHUNK = 1 << 20  # codes per numpy call


def text_codes(data: bytes) -> np.ndarray:
    """Unicode code points of UTF-8 `data` (raises UnicodeDecodeError): uint8 for ASCII, else uint32."""
    if data.isascii():  # the common case (PTB, text8): the bytes are the code points, no copy
        return np.frombuffer(data, dtype=np.uint8)
    # (n,) uint32: UTF-32 is one fixed-width unit per code point, so the buffer is the array.
    return np.frombuffer(data.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)


def code_counts(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """counts[code] = how often `code` occurs over all arrays (the vocabulary is built over all splits)."""
    size = max(int(a.max()) + 1 for a in arrays.values() if len(a))
    counts = np.zeros(size, dtype=np.int64)
    for a in arrays.values():
        for start in range(0, len(a), CHUNK):
            counts += np.bincount(a[start : start + CHUNK], minlength=size)
    return counts


def id_dtype(vocab_size: int) -> np.dtype:
    """uint8 when every id fits in a byte, else uint16 (docs/design.md, "Data format")."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 65536:
        return np.dtype(np.uint16)
    raise UserError(
        f"the text has {vocab_size:,} distinct characters, more than the 65,536 a dataset can hold: use --level bytes"
    )


def to_ids(arrays: Mapping[str, np.ndarray], present: np.ndarray) -> dict[str, np.ndarray]:
    """Map each array of codes to token ids: the id of a code is its rank among the `present` codes."""
    dtype = id_dtype(len(present))
    lookup = np.zeros(int(present[-1]) + 1, dtype=dtype)  # code -> id
    lookup[present] = np.arange(len(present), dtype=dtype)
    ids = {}
    for name, codes in arrays.items():
        out = np.empty(len(codes), dtype=dtype)
        for start in range(0, len(codes), CHUNK):
            np.take(lookup, codes[start : start + CHUNK], out=out[start : start + CHUNK])
        ids[name] = out
    return ids


def tokenize(
    arrays: Mapping[str, np.ndarray], kind: str, space: str | None = None
) -> tuple[Vocab, dict[str, np.ndarray]]:
    """Vocabulary over all `arrays` of codes, and each array as token ids.

    kind: "chars" (codes are code points) or "bytes" (codes are byte values). space: the symbol that stands
    for a space; None picks " " when the data has a space (code 32), else no space symbol.
    """
    present = np.flatnonzero(code_counts(arrays))
    if space is None and 32 in present:
        space = " "
    symbols = [chr(c) for c in present] if kind == "chars" else [int(c) for c in present]
    return Vocab(kind=kind, symbols=symbols, space=space), to_ids(arrays, present)
