"""The vocabulary of a dataset: which symbol each token id stands for, and text <-> ids.

Two kinds (vocab.json `kind`):
- `chars`: symbols are strings of one Unicode character each (PTB, text8, your own text by default; the end
  of line is "\\n").
- `bytes`: symbols are the integers 0-255 of the bytes present in the data (enwik8, `--level bytes`); text
  is encoded to UTF-8 before lookup and decoded from UTF-8 (invalid sequences shown as U+FFFD).

`space` names the symbol that stands for a space, so that typed text with spaces encodes right and decoded
text reads naturally: "_" for PTB (which writes word boundaries as `_`), " " for text8 and most texts, None
when the data has no space. For `bytes` it is " " when byte 32 is present: then the space symbol is the
integer 32. Symbols are sorted (by code point, or by byte value), so a vocabulary does not depend on the
order in which the data shows them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hmlm.errors import UserError

KINDS = ("chars", "bytes")


@dataclass
class Vocab:
    kind: str  # "chars" | "bytes"
    symbols: list  # list[str] for chars, list[int] for bytes; index = token id
    space: str | None = None  # the symbol standing for a space ("_" for PTB, " " for text8), or None
    _index: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"vocabulary kind {self.kind!r} is not one of {', '.join(KINDS)}")
        self.symbols = list(self.symbols)
        self._index = {symbol: i for i, symbol in enumerate(self.symbols)}
        if len(self._index) != len(self.symbols):
            raise UserError("the vocabulary lists a symbol twice: prepare the dataset again with --force")

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def space_id(self) -> int | None:
        """Token id of the space symbol (word boundaries are its positions), or None."""
        if self.space is None:
            return None
        key = ord(self.space) if self.kind == "bytes" else self.space
        return self._index.get(key)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a typed space stands for the dataset's space symbol (PTB: "_")."""
        if self.kind == "bytes":
            keys: Sequence[Any] = text.encode("utf-8")
        else:
            if self.space is not None and self.space != " ":
                text = text.replace(" ", self.space)
            keys = text
        try:
            return [self._index[key] for key in keys]
        except KeyError:
            raise UserError(self._missing_message(text)) from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (a list, a 1-D numpy array or tensor); the space symbol shown as " "."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors: one conversion, not one per element
            ids = ids.tolist()
        if self.kind == "bytes":
            return bytes(self.symbols[i] for i in ids).decode("utf-8", errors="replace")
        text = "".join(self.symbols[i] for i in ids)
        if self.space is not None and self.space != " ":
            text = text.replace(self.space, " ")
        return text

    def to_dict(self) -> dict:
        """Exactly the content of vocab.json."""
        return {"kind": self.kind, "symbols": list(self.symbols), "space": self.space}

    @classmethod
    def from_dict(cls, d: dict) -> Vocab:
        try:
            kind, symbols, space = d["kind"], d["symbols"], d["space"]
        except (KeyError, TypeError):
            raise UserError(
                "the vocabulary is malformed (it needs kind, symbols and space): prepare the dataset again"
            ) from None
        expected = int if kind == "bytes" else str
        if not isinstance(symbols, list) or not all(isinstance(s, expected) for s in symbols):
            raise UserError(f"the vocabulary's symbols are not all {expected.__name__}: prepare the dataset again")
        return cls(kind=kind, symbols=symbols, space=space)

    def _missing_message(self, text: str) -> str:
        """One line naming every character of `text` that this vocabulary cannot encode, in order."""
        missing: list[str] = []
        for char in dict.fromkeys(text):  # unique, in order of appearance
            keys = char.encode("utf-8") if self.kind == "bytes" else [char]
            if any(key not in self._index for key in keys):
                missing.append(repr(char))
        return (
            f"the vocabulary of this dataset lacks {', '.join(missing)}: "
            "write the text with characters the dataset has (PTB, for one, is lower-case)"
        )
