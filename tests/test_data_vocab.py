"""Vocab: the space symbol, unknown characters, bytes, vocab.json round trips; the numpy tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmlm.data import Vocab
from hmlm.data.tokenize import CHUNK, text_codes, tokenize
from hmlm.errors import UserError

PTB = Vocab("chars", ["\n", "_", "a", "c", "e", "h", "m", "n", "o", "p", "t", "y"], space="_")


def test_a_typed_space_stands_for_the_space_symbol() -> None:
    ids = PTB.encode("the company\n")
    assert ids[3] == PTB.space_id == 1
    assert PTB.decode(ids) == "the company\n"
    assert PTB.decode(torch.tensor(ids)) == PTB.decode(np.array(ids)) == "the company\n"


def test_unknown_characters_are_named_in_one_user_error() -> None:
    with pytest.raises(UserError, match=r"lacks 'T', 'Z': .*characters the dataset has"):
        PTB.encode("The company Zen")


def test_bytes_vocabulary_encodes_utf8_and_names_missing_characters() -> None:
    text = "café au lait"
    vocab = Vocab("bytes", sorted(set(text.encode("utf-8"))), space=" ")
    assert vocab.space_id == vocab.symbols.index(32)
    assert vocab.decode(vocab.encode(text)) == text
    assert len(vocab.encode("é")) == 2  # two UTF-8 bytes
    with pytest.raises(UserError, match=r"lacks 'ü'"):
        vocab.encode("über")
    assert vocab.decode(vocab.encode("é")[:1]) == "\ufffd"  # half a character decodes as U+FFFD


def test_to_dict_is_vocab_json_and_round_trips() -> None:
    assert PTB.to_dict() == {"kind": "chars", "symbols": PTB.symbols, "space": "_"}
    assert Vocab.from_dict(PTB.to_dict()) == PTB
    with pytest.raises(UserError, match="malformed"):
        Vocab.from_dict({"kind": "chars"})
    with pytest.raises(UserError, match="not all int"):
        Vocab.from_dict({"kind": "bytes", "symbols": ["a"], "space": None})


def test_tokenize_builds_one_sorted_vocabulary_over_all_splits() -> None:
    codes = {
        "train": np.frombuffer(b"banana bread", dtype=np.uint8),
        "valid": np.frombuffer(b"zz", dtype=np.uint8),  # only in valid: still in the vocabulary
        "test": np.frombuffer(b"ab", dtype=np.uint8),
    }
    vocab, ids = tokenize(codes, "chars")
    assert vocab.symbols == [" ", "a", "b", "d", "e", "n", "r", "z"] and vocab.space == " "
    assert ids["valid"].dtype == np.uint8 and ids["valid"].tolist() == [7, 7]
    assert vocab.decode(ids["train"]) == "banana bread"


def test_tokenize_chunks_and_wide_vocabularies() -> None:
    rng = np.random.default_rng(0)
    codes = rng.integers(0x4E00, 0x4E00 + 300, size=CHUNK * 2 + 17).astype(np.uint32)  # 300 CJK characters
    vocab, ids = tokenize({"train": codes, "valid": codes[:5], "test": codes[:5]}, "chars")
    assert len(vocab) == 300 and ids["train"].dtype == np.uint16 and vocab.space is None
    lookup = np.array([ord(s) for s in vocab.symbols], dtype=np.uint32)
    assert np.array_equal(lookup[ids["train"]], codes)


def test_text_codes_are_code_points() -> None:
    assert text_codes(b"abc").dtype == np.uint8
    assert text_codes("aé🙂".encode()).tolist() == [ord("a"), ord("é"), ord("🙂")]
