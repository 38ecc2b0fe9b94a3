"""Boundary statistics and the figure: scores on hand-made cases, the PNG, the JSON, and the commands end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hmlm import CharLM, ModelConfig
from hmlm.analysis.boundaries.drawing import draw, figure_size
from hmlm.analysis.boundaries.metrics import (
    Match,
    activity,
    end_gaps,
    match,
    reference_gaps,
    score,
    surprisal_peaks,
)
from hmlm.analysis.boundaries.reading import TextBoundaries, read_text, symbols_of
from hmlm.analysis.evaluate import evaluate
from hmlm.checkpoint import load_trained
from hmlm.cli import app
from hmlm.config import from_dict
from hmlm.data import StreamBatcher, Vocab, open_dataset, prepare_dataset
from hmlm.errors import UserError
from hmlm.training.trainer import train

TEXT = "the cat sat"  # spaces at 3 and 7: the words end at 2, 6 and 10


def space_gaps_of(text: str) -> np.ndarray:
    """(len + 1,) the reference gaps of a text: gap t before each space; the gap after the text is unknown."""
    return np.array([c == " " for c in text] + [False])


def fired_at(length: int, *positions: int) -> np.ndarray:
    z = np.zeros(length)
    z[list(positions)] = 1.0
    return z


def scored(*positions: int) -> Match:
    return match(fired_at(len(TEXT), *positions), space_gaps_of(TEXT))


# ---- scores on hand-made cases -----------------------------------------------------------------------------------


def test_perfect_boundaries_on_the_last_letters_or_on_the_spaces():
    for positions in [(2, 6), (3, 7), (2, 7)]:
        m = scored(*positions)
        assert (m.hits, m.predicted, m.reference) == (2, 2, 2)
        assert m.precision == m.recall == m.f1 == 1.0


def test_no_boundaries_score_zero():
    m = scored()
    assert (m.hits, m.predicted, m.reference) == (0, 0, 2)
    assert m.precision == m.recall == m.f1 == 0.0


def test_off_by_one_misses():
    early = scored(1, 5)  # one before the last letter
    late = scored(4, 8)  # the first letter of the next word: two after the last letter
    assert early.hits == late.hits == 0 and early.f1 == late.f1 == 0.0


def test_a_reference_is_hit_once_when_both_its_letter_and_its_space_fire():
    m = scored(2, 3, 6, 7)
    assert (m.hits, m.predicted, m.reference) == (2, 4, 2)
    assert m.precision == 0.5 and m.recall == 1.0 and m.f1 == pytest.approx(2 / 3)


def test_every_character_baseline():
    m = scored(*range(len(TEXT)))
    assert (m.hits, m.predicted, m.reference) == (2, 11, 2)
    assert m.precision == pytest.approx(2 / 11) and m.recall == 1.0 and m.f1 == pytest.approx(4 / 13)


def test_true_ends_are_hit_on_the_last_letter_or_the_separator_after_it():
    # "ka, de.": the words end at 1 ("a") and 5 ("e"); the space at 3 comes after the comma
    gaps = np.append(end_gaps(np.array([0, 1, 0, 0, 0, 1, 0])), False)  # (8,) gap r + 1 after each end r
    assert gaps.nonzero()[0].tolist() == [2, 6]
    assert match(fired_at(7, 2, 5), gaps).hits == 2  # on the comma, on the last letter
    assert match(fired_at(7, 3, 4), gaps).hits == 0  # on the space after the comma, one letter early


def greedy_hits(predicted: np.ndarray, gaps: np.ndarray) -> int:
    """The rule of the docstring, written as a loop: left to right, each prediction takes the earlier free gap."""
    free = gaps.astype(bool).copy()
    hits = 0
    for t in np.flatnonzero(predicted):
        for g in (t, t + 1):
            if free[g]:
                free[g], hits = False, hits + 1
                break
    return hits


def test_the_vectorized_count_is_the_left_to_right_matching():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 30))
        predicted = rng.random(n) < rng.random()
        gaps = rng.random(n + 1) < rng.random()  # dense gaps: runs of adjacent references, as double spaces make
        assert match(predicted, gaps).hits == greedy_hits(predicted, gaps)


def test_streams_are_scored_apart():
    """A prediction at the end of one stream cannot hit a reference at the start of the next."""
    predicted = np.array([[0, 0, 1], [0, 0, 0]])
    gaps = np.array([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)
    assert match(predicted, gaps).hits == 0
    assert match(predicted[:1], np.array([[0, 0, 0, 1]], dtype=bool)).hits == 1


def test_references_prefer_true_word_ends_over_spaces():
    tokens = np.array([5, 9, 0, 5])  # 0 is the space
    ends = {"word": np.array([0, 1, 0, 1], dtype=np.uint8), "phrase": np.array([0, 0, 0, 1], dtype=np.uint8)}
    assert reference_gaps(tokens, 0)["word"].tolist() == [False, False, True, False]
    refs = reference_gaps(tokens, 0, ends)
    assert refs["word"].tolist() == [False, False, True, False]  # gap r + 1 after each end r (the last is cut off)
    assert refs["phrase"].tolist() == [False] * 4
    assert reference_gaps(tokens, None) == {}


# ---- rates, segments, baselines ----------------------------------------------------------------------------------


def test_rate_and_mean_segment_length():
    act = activity(fired_at(10, 2, 6)[None])  # segments 0-2 and 3-6 closed; 7-9 still open
    assert act.rate == pytest.approx(0.2) and act.mean_segment == pytest.approx(3.5)
    assert activity(np.zeros((1, 5))).mean_segment is None
    soft = activity(np.array([[0.2, 0.9, 0.4, 0.6]]))
    assert soft.rate == pytest.approx(0.525) and soft.boundaries == 2 and soft.mean_segment == pytest.approx(2.0)


def test_boundaries_opened_on_a_copy_step_are_counted():
    """Layer 2 copies where it did not fire at the step before and layer 1 does not fire now."""
    z1 = np.array([[0, 1, 0, 0, 0, 1]], dtype=float)
    z2 = np.array([[1, 0, 1, 1, 0, 1]], dtype=float)  # t=0: copy (a fresh state), t=2: copy, t=3: after a boundary
    act = activity(z2, z1)
    assert (act.boundaries, act.on_copy) == (4, 2) and act.on_copy_share == 0.5
    assert activity(z2).on_copy == 0  # layer 1 never copies
    flat = score(np.stack([z1, z2], axis=-1), {}).flat()
    assert flat["boundary_on_copy_layer2"] == 0.5 and "boundary_on_copy_layer1" not in flat


def test_score_adds_up_over_streams_and_seeds_the_random_baseline():
    rng = np.random.default_rng(1)
    z = (rng.random((3, 50, 2)) < 0.3).astype(np.float32)  # (S, P, L-1)
    gaps = {"word": rng.random((3, 51)) < 0.2}
    whole = score(z, gaps, seed=5)
    per_stream = [score(z[s : s + 1], {"word": gaps["word"][s : s + 1]}, seed=5) for s in range(3)]
    added = per_stream[0] + per_stream[1] + per_stream[2]
    for scorer in ("layer1", "layer2", "every_char"):
        assert whole.matches["word"][scorer] == added.matches["word"][scorer]
    assert [a.rate for a in whole.layers] == pytest.approx([a.rate for a in added.layers])
    assert score(z, gaps, seed=5) == whole and score(z, gaps, seed=6) != whole  # random_layer* depend on the seed
    random = whole.matches["word"]["random_layer1"]
    assert abs(random.predicted - whole.layers[0].boundaries) < 0.25 * whole.layers[0].boundaries  # the same rate
    assert whole.with_numbers(whole.numbers()) == whole
    keys = whole.flat()
    assert {"boundary_f1_word_layer1", "boundary_f1_word_every_char", "boundary_f1_word_random_layer2"} <= set(keys)
    assert not any("every_char" in k or "random" in k for k in whole.flat(baselines=False))


def test_bytes_symbols_and_the_space_symbol():
    vocab = Vocab("bytes", sorted(set(" caf\u00e9".encode())), space=" ")
    assert symbols_of(vocab, vocab.encode("caf\u00e9 ")) == ["c", "a", "f", "\u00e9", "", " "]
    ptb = Vocab("chars", ["\n", "_", "a", "b"], space="_")
    assert symbols_of(ptb, ptb.encode("ab ba\n")) == ["a", "b", " ", "b", "a", "\n"]


def test_soft_boundaries_keep_their_values_and_models_without_boundaries_are_refused():
    torch.manual_seed(0)
    vocab = Vocab("chars", [" ", "a", "b", "c"], space=" ")
    soft = CharLM(len(vocab), ModelConfig(embed_dim=4, hidden_sizes=[8, 8, 8], output_embed_dim=8, boundary="soft"))
    result = read_text(soft, vocab, "ab ca bc")
    z1 = result.to_json()["boundaries"]["layer1"]
    assert len(z1) == 8 and all(isinstance(z, float) for z in z1) and not set(z1) <= {0.0, 1.0}
    assert result.stats.layers[0].rate == pytest.approx(np.mean(z1))
    assert result.stats.layers[0].boundaries == sum(z > 0.5 for z in z1)
    for config in (ModelConfig(kind="lstm", hidden_sizes=[8, 8]), ModelConfig(hidden_sizes=[8])):
        with pytest.raises(UserError, match="no boundary detectors"):
            read_text(CharLM(len(vocab), config), vocab, "ab")


# ---- the figure --------------------------------------------------------------------------------------------------


def fake_result(text: str, layers: int = 3) -> TextBoundaries:
    rng = np.random.default_rng(0)
    z = (rng.random((len(text), layers - 1)) < 0.3).astype(np.float32)
    gates = rng.random((len(text), layers)).astype(np.float32)
    stats = score(z[None], {"word": space_gaps_of(text)[None]})
    return TextBoundaries(text, list(range(len(text))), list(text), z, gates, stats)


@pytest.mark.parametrize(("length", "wrap", "blocks"), [(37, 100, 1), (110, 50, 3)])
def test_the_png_is_an_image_of_the_size_asked(tmp_path: Path, length: int, wrap: int, blocks: int):
    from PIL import Image

    text = ("the cat sat on the mat. " * 11)[:length]
    path = tmp_path / "out" / "fig.png"  # the folder is made
    size = draw(fake_result(text), path, wrap=wrap, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_row = -(-length // blocks)  # rows of even length
    assert size == figure_size(length, 3, wrap) and size[0] == figure_size(per_row, 3)[0]
    one_block = figure_size(per_row, 3)[1]
    assert (blocks == 1) == (size[1] == one_block) and size[1] >= blocks * (one_block - 80)
    image = Image.open(path)
    assert image.size == size
    pixels = np.asarray(image.convert("L"))
    assert (pixels < 30).mean() > 0.005 and (pixels > 225).mean() > 0.3  # black boundaries on a white page
    assert [p.name for p in path.parent.iterdir()] == ["fig.png"]  # no temporary file left behind


def test_a_figure_that_is_not_a_png_is_refused(tmp_path: Path):
    with pytest.raises(UserError, match=r"\.png"):
        draw(fake_result(TEXT), tmp_path / "fig.jpg")
    assert not any(tmp_path.iterdir())


# ---- a trained model, end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny HM-LSTM trained for 8 steps on the synthetic corpus, evaluated at steps 4 and 8."""
    data = tmp_path_factory.mktemp("data")
    prepare_dataset("synthetic", data)
    config = from_dict({
        "data": {"name": "synthetic", "dir": str(data)},
        "model": {"embed_dim": 8, "hidden_sizes": [16, 16, 16], "output_embed_dim": 16},
        "train": {"batch_size": 4, "seq_len": 20, "max_steps": 8, "eval_every": 4, "eval_tokens": 400,
                  "log_every": 4, "sample_length": 0},
    })  # fmt: skip
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(config, run_dir, progress=False)
    return run_dir


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None:
        raise result.exception
    assert result.exit_code == 0, result.output
    return result.stdout


SENTENCE = "ka demopi soluta, nirabe ko sateni. ka gupo"


def test_text_json_lists_are_as_long_as_the_text(run: Path):
    report = json.loads(invoke("boundaries", str(run), "--text", SENTENCE, "--json"))
    n = len(SENTENCE)
    assert report["text"] == SENTENCE and report["symbols"] == list(SENTENCE)
    assert set(report["boundaries"]) == {"layer1", "layer2"} and set(report["gates"]) == {"layer1", "layer2", "layer3"}
    assert all(len(v) == n and set(v) <= {0, 1} for v in report["boundaries"].values())
    assert all(len(v) == n and all(0 < g < 1 for g in v) for v in report["gates"].values())
    # the same numbers as the model gives on the text from a fresh state
    trained = load_trained(run)
    with torch.no_grad():
        out = trained.model(torch.tensor([trained.vocab.encode(SENTENCE)]))
    assert report["boundaries"]["layer2"] == out.boundaries[0, :, 1].int().tolist()
    assert report["gates"]["layer3"] == pytest.approx(out.gates[0, :, 2].tolist())
    z1 = np.array(report["boundaries"]["layer1"])
    assert report["boundary_f1_word_layer1"] == pytest.approx(match(z1, space_gaps_of(SENTENCE)).f1)
    assert report["boundary_rate_layer1"] == pytest.approx(z1.mean())
    assert report["boundary_recall_word_every_char"] == 1.0


def test_text_view_marks_each_layer_under_the_text(run: Path):
    shown = invoke("boundaries", str(run), "--text", SENTENCE).splitlines()
    report = json.loads(invoke("boundaries", str(run), "--text", SENTENCE, "--json"))
    assert shown[0] == f"     text  {SENTENCE}"
    for layer in (1, 2):
        marks = "".join("|" if z else " " for z in report["boundaries"][f"layer{layer}"]).rstrip()
        assert shown[layer] == f"  layer {layer}  {marks}".rstrip()
    assert any(line.startswith("every symbol") for line in shown)
    assert any(line.startswith("random @ layer 2") for line in shown)
    wrapped = invoke("boundaries", str(run), "--text", SENTENCE, "--wrap", "20").splitlines()
    rows = [line[11:] for line in wrapped if line.startswith("     text")]
    assert rows == [SENTENCE[:15], SENTENCE[15:30], SENTENCE[30:]]  # 43 symbols in 3 even rows, not 20 + 20 + 3


def test_out_writes_the_png_and_json_stays_clean(run: Path, tmp_path: Path):
    from PIL import Image

    path = tmp_path / "fig.png"
    report = json.loads(invoke("boundaries", str(run), "--text", SENTENCE, "--out", str(path), "--json"))
    assert len(report["symbols"]) == len(SENTENCE)
    assert Image.open(path).size == figure_size(len(SENTENCE), 3)
    said = invoke("boundaries", str(run), "--text", SENTENCE, "--out", str(path))
    assert said.startswith(f"wrote {path}")


def test_split_scores_with_baselines_and_eval_reports_f1(run: Path):
    split = json.loads(invoke("boundaries", str(run), "--split", "valid", "--max-tokens", "2000", "--json"))
    for key in ("boundary_f1_word_layer1", "boundary_f1_phrase_layer2", "boundary_f1_word_every_char",
                "boundary_f1_phrase_random_layer1", "boundary_mean_segment_layer2"):  # fmt: skip
        assert 0 <= split[key] <= 20, key
    assert split["boundary_recall_word_every_char"] == 1.0 and 0 < split["tokens"] <= 2000 + 64
    assert split["boundary_on_copy_layer2"] in (0.0, None)  # hmlm's cell never opens a boundary on a COPY step
    table = invoke("boundaries", str(run), "--split", "valid", "--max-tokens", "2000")
    assert "phrase P" in table and "every symbol" in table

    report = json.loads(invoke("eval", str(run), "--json"))
    assert {"boundary_f1_word_layer1", "boundary_f1_word_layer2", "boundary_f1_phrase_layer2"} <= set(report)
    assert not any("every_char" in key for key in report)
    assert report["boundary_rate_layer1"] > 0


def test_evaluate_aligns_the_references_with_the_streams(run: Path):
    """evaluate()'s counts equal a count made here from the raw label arrays, cut into streams by hand."""
    trained = load_trained(run)
    dataset = open_dataset(trained.config.data.name, trained.config.data.dir)
    tokens, ends = dataset.split("valid")[:404], dataset.true_boundaries("valid")["phrase"][:404]
    result = evaluate(trained.model, tokens, 4, 20, references=reference_gaps(tokens, None, {"phrase": ends}))
    streams = np.asarray(ends).reshape(4, 101)  # 4 streams of n = 101: inputs at positions 0..99
    z, state = [], None
    for x, _ in StreamBatcher(tokens, 4, 20):
        out = trained.model(x, state)
        z.append(out.boundaries.detach())
        state = out.state
    z = torch.cat(z, dim=1).numpy()  # (4, 100, 2)
    gaps = np.zeros((4, 101), dtype=bool)
    gaps[:, 1:] = streams[:, :100]  # a unit ending at r puts its gap at r + 1; gap 0 needs the symbol before
    gaps[1:, 0] = streams[:-1, 100]  # ... which for streams 2-4 is the last symbol of the stream before
    for layer in (0, 1):
        assert result.boundary_stats.matches["phrase"][f"layer{layer + 1}"] == match(z[:, :, layer], gaps)
    assert [a.rate for a in result.boundary_stats.layers] == pytest.approx(result.boundary_rate)


def test_tensorboard_has_the_f1_scalars(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    tags = ("valid/boundary_f1_word_layer1", "valid/boundary_f1_phrase_layer2", "valid/boundary_recall_word_layer2")
    for tag in tags:
        assert [e.step for e in events.Scalars(tag)] == [4, 8], tag
        assert all(0 <= e.value <= 1 for e in events.Scalars(tag))


def test_bad_inputs(run: Path, tmp_path: Path):
    for args, message in [
        (["--text", "ka \u00e9x"], "'\u00e9', 'x'"),
        ([], "either --text"),
        (["--text", "ka", "--split", "valid"], "either --text"),
        (["--split", "valid", "--out", "f.png"], "with --text"),
        (["--text", "ka", "--out", str(tmp_path / "f.svg")], ".png"),
        (["--text", "ka", "--wrap", "3"], "--wrap"),
        (["--split", "train"], "valid or test"),
    ]:
        with pytest.raises(UserError, match=message if message[0] != "." else r"\.png"):
            invoke("boundaries", str(run), *args)
    assert not any(tmp_path.iterdir())
    # as a user meets it: one line, exit status 2, no traceback
    result = subprocess.run([sys.executable, "-m", "hmlm", "boundaries", str(run), "--text", "ka \u00e9"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "'\u00e9'" in result.stderr


# ---- the surprisal-peak baseline ---------------------------------------------------------------------------------


def test_surprisal_peaks_are_larger_than_both_neighbours():
    s = np.array([[4.0, 1.0, 3.0, 2.0, 5.0, 5.0, 1.0, 2.0]])
    # 0: larger than its one neighbour; 2: a peak; 4 and 5: a tie is no peak; 7: the end, larger than 6
    assert np.flatnonzero(surprisal_peaks(s)[0]).tolist() == [0, 2, 7]
    unknown = np.array([[1.0, 2.0, np.nan]])  # the last symbol of a text: its successor is not given
    assert surprisal_peaks(unknown)[0].tolist() == [False, True, False]
    assert surprisal_peaks(np.array([[1.0, 2.0], [3.0, 1.0]])).tolist() == [[False, True], [True, False]]  # per stream


def test_score_adds_the_surprisal_peak_baseline():
    rng = np.random.default_rng(2)
    z = (rng.random((2, 40, 2)) < 0.3).astype(np.float32)
    gaps = {"word": rng.random((2, 41)) < 0.2}
    surprisal = rng.random((2, 40))
    stats = score(z, gaps, seed=1, surprisal=surprisal)
    assert stats.matches["word"]["surprisal_peak"] == match(surprisal_peaks(surprisal), gaps["word"])
    assert "surprisal_peak" not in score(z, gaps, seed=1).matches["word"]
    flat = stats.flat(baselines=False, rates=False)  # what `hmlm eval --json` and TensorBoard show
    assert "boundary_f1_word_surprisal_peak" in flat and "boundary_f1_word_every_char" not in flat
    assert flat["boundary_rate_surprisal_peak"] == pytest.approx(surprisal_peaks(surprisal).mean())
    assert "surprisal peaks" in stats.table()
    assert stats.with_numbers(stats.numbers()) == stats


def test_evaluate_finds_the_surprisal_peaks_of_each_stream(run: Path):
    """evaluate()'s surprisal-peak counts equal those made here from the model's own next-symbol surprisal."""
    trained = load_trained(run)
    dataset = open_dataset(trained.config.data.name, trained.config.data.dir)
    tokens, ends = dataset.split("valid")[:404], dataset.true_boundaries("valid")["word"][:404]
    result = evaluate(trained.model, tokens, 4, 20, references=reference_gaps(tokens, None, {"word": ends}))
    surprisal, state = [], None
    with torch.no_grad():
        for x, y in StreamBatcher(tokens, 4, 20):
            out = trained.model(x, state)
            surprisal.append(torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), y, reduction="none"))
            state = out.state
    peaks = surprisal_peaks(torch.cat(surprisal, dim=1).double().numpy())  # (4, 100)
    streams = np.asarray(ends).reshape(4, 101)
    gaps = np.zeros((4, 101), dtype=bool)
    gaps[:, 1:] = streams[:, :100]
    gaps[1:, 0] = streams[:-1, 100]
    assert result.boundary_stats.matches["word"]["surprisal_peak"] == match(peaks, gaps)
    assert 0 < peaks.mean() < 0.5


def test_the_commands_show_the_surprisal_peak_baseline(run: Path):
    split = json.loads(invoke("boundaries", str(run), "--split", "valid", "--max-tokens", "2000", "--json"))
    assert 0 <= split["boundary_f1_word_surprisal_peak"] <= 1 and 0 < split["boundary_rate_surprisal_peak"] < 1
    assert "surprisal peaks" in invoke("boundaries", str(run), "--split", "valid", "--max-tokens", "2000")
    report = json.loads(invoke("eval", str(run), "--json"))
    assert {"boundary_f1_word_surprisal_peak", "boundary_f1_phrase_surprisal_peak"} <= set(report)
    text = json.loads(invoke("boundaries", str(run), "--text", SENTENCE, "--json"))
    assert "boundary_f1_word_surprisal_peak" in text
