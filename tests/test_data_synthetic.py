"""The synthetic dataset: seeded, and its stored boundaries are the true word and phrase ends."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from hmlm.data import open_dataset, prepare_dataset, prepare_synthetic
from hmlm.data.synthetic import generate


def test_generation_is_seeded() -> None:
    assert generate(20_000, seed=1).text == generate(20_000, seed=1).text
    assert generate(20_000, seed=1).text != generate(20_000, seed=2).text
    assert len(generate(20_000, seed=1).text) == 20_000


def test_boundaries_are_the_last_letters_of_words_and_phrases() -> None:
    corpus = generate(50_000, seed=3)
    text = corpus.text.decode("ascii")
    # Cut after the last "," or ".", so every unit below is whole.
    end = max(text.rfind(", "), text.rfind(". "), text.rfind(".\n")) + 1
    text = text[:end]
    word_ends = [m.end() - 1 for m in re.finditer(r"[a-z]+", text)]
    phrase_ends = [m.end() - 1 for m in re.finditer(r"[a-z]+(?=[,.])", text)]
    assert np.flatnonzero(corpus.word_ends[:end]).tolist() == word_ends
    assert np.flatnonzero(corpus.phrase_ends[:end]).tolist() == phrase_ends
    assert set(text) <= set("abdegiklmnoprstu ,.\n")
    assert re.fullmatch(r"([a-z]+( [a-z]+)*(, |\. |\.\n))*[a-z]+( [a-z]+)*[,.]", text)


def test_prepared_synthetic_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = prepare_dataset("synthetic", tmp_path)  # the default size, as `hmlm data synthetic` makes it
    ds = open_dataset("synthetic", tmp_path)
    assert path == ds.path and ds.vocab.kind == "chars" and ds.vocab.space == " "
    assert {s: len(ds.split(s)) for s in ("train", "valid", "test")} == {
        "train": 2_700_000,
        "valid": 150_000,
        "test": 150_000,
    }
    truth = ds.true_boundaries("valid")
    assert set(truth) == {"word", "phrase"} and all(len(a) == 150_000 for a in truth.values())
    valid = np.asarray(ds.split("valid"))
    letters = np.array([c.isalpha() for c in ds.vocab.symbols])
    assert letters[valid[truth["word"] == 1]].all()  # a word ends on a letter
    assert (truth["phrase"] <= truth["word"]).all()  # a phrase ends where a word ends
    assert 0.1 < truth["word"].mean() < 0.3

    capsys.readouterr()
    prepare_synthetic(tmp_path)
    assert "already prepared" in capsys.readouterr().out


def test_real_text_has_no_true_boundaries(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("some words here " * 20)
    from hmlm.data import prepare_text

    prepare_text(tmp_path / "t.txt", data_dir=tmp_path / "data")
    assert open_dataset("t", tmp_path / "data").true_boundaries("train") == {}
