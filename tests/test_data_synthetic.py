"""The synthetic dataset: seeded, and its stored boundaries are the true word and phrase ends."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import run_hmlm

from hmlm.data import open_dataset, prepare_dataset, prepare_synthetic
from hmlm.data.synthetic import generate
from hmlm.errors import UserError


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


def test_no_spaces_is_the_same_language_without_separators_inside_phrases() -> None:
    spaced, joined = generate(50_000, seed=3), generate(50_000, seed=3, spaces=False)
    text = joined.text.decode("ascii")
    assert " " not in re.sub(r"[,.] ", "", text)  # a space only after the phrase punctuation
    assert re.fullmatch(r"([a-z]+(, |\. |\.\n))*[a-z]*[,.]?", text)
    # The same words in the same order (the same seed draws the same sentences): cut the text at its true word ends.
    words = re.findall(r"[a-z]+", spaced.text.decode("ascii"))
    ends = np.flatnonzero(joined.word_ends)
    cut = [text[a + 1 : b + 1].lstrip(", .\n") for a, b in zip([-1, *ends[:-1]], ends, strict=True)]
    n = min(len(cut), len(words) - 1)  # the last word of either text may be cut short
    assert cut[:n] == words[:n] and n > 5000
    # Phrase ends are the word ends before the punctuation, as with spaces.
    phrase_ends = [m.end() - 1 for m in re.finditer(r"[a-z]+(?=[,.])", text)]
    assert np.flatnonzero(joined.phrase_ends).tolist() == phrase_ends
    assert (joined.phrase_ends <= joined.word_ends).all()


def test_seed_and_no_spaces_are_recorded_and_a_folder_of_other_settings_is_refused(tmp_path: Path) -> None:
    path = prepare_synthetic(tmp_path, chars=20_000, seed=4, spaces=False)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["generator"] == {"version": 1, "seed": 4, "spaces": False, "chars": 20_000}
    assert "no spaces" in meta["source"]["name"]
    ds = open_dataset("synthetic", tmp_path)
    assert set(ds.true_boundaries("test")) == {"word", "phrase"}  # what scoring reads: no format change needed
    before = (path / "train.bin").read_bytes()
    with pytest.raises(UserError, match="holds the synthetic text of seed 4, no spaces, not seed 4, with spaces"):
        prepare_synthetic(tmp_path, chars=20_000, seed=4)
    with pytest.raises(UserError, match="not seed 5, no spaces: pass --force"):
        prepare_synthetic(tmp_path, chars=20_000, seed=5, spaces=False)
    assert (path / "train.bin").read_bytes() == before
    prepare_synthetic(tmp_path, chars=20_000, seed=5, spaces=False, force=True)
    assert (path / "train.bin").read_bytes() != before


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["ptb", "--seed", "3"], "--seed"),
        (["text8", "--no-spaces"], "--no-spaces"),
        (["enwik8", "--seed", "1", "--no-spaces"], "--seed"),
        (["text", "book.txt", "--no-spaces"], "--no-spaces"),
    ],
)
def test_synthetic_flags_on_another_dataset_exit_2_naming_the_flag(args: list[str], flag: str, tmp_path: Path) -> None:
    (tmp_path / "book.txt").write_text("some words here " * 20)
    result = run_hmlm("data", *args, "--data-dir", "d", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and flag in result.stderr
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
