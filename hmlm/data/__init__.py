"""Datasets: download, verify and tokenize them (`hmlm data`), open them, and cut them into batches.

    prepare_dataset("ptb")                       # DATA_DIR/ptb/{train,valid,test}.bin, vocab.json, meta.json
    prepare_text(Path("book.txt"), name="book")  # your own text, same format
    ds = open_dataset("ptb")
    ds.vocab.encode("the company"), ds.split("train")          # memory-mapped token ids
    for x, y in StreamBatcher(ds.split("train"), batch_size=64, seq_len=100): ...

Module map: sources (registry: URLs, members, checksums), download (resumable HTTP), extract (safe reading
of archive members), tokenize (codes -> ids with numpy), vocab (Vocab), store (atomic writing), prepare
(the registry datasets), synthetic (the generated dataset), text (your own text), dataset (Dataset,
open_dataset), batches (StreamBatcher).
"""

from hmlm.data.dataset import Dataset, open_dataset
from hmlm.data.prepare import prepare_dataset
from hmlm.data.sources import DATASETS, SPLITS
from hmlm.data.synthetic import prepare_synthetic
from hmlm.data.text import prepare_text
from hmlm.data.vocab import Vocab


def __getattr__(name: str) -> object:
    # StreamBatcher needs torch (seconds to import): load it only when asked for, so preparing data does not.
    if name == "StreamBatcher":
        from hmlm.data.batches import StreamBatcher

        return StreamBatcher
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "SPLITS",
    "Dataset",
    "StreamBatcher",
    "Vocab",
    "open_dataset",
    "prepare_dataset",
    "prepare_synthetic",
    "prepare_text",
]
