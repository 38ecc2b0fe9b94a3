"""`hmlm data synthetic`: text with a known hierarchy, generated here (seeded, no download).

The language, bottom up:
- syllables: a consonant and a vowel (11 x 5 lower-case letters);
- words: a lexicon of one-syllable function words (class D) and two- or three-syllable nouns (N) and verbs
  (V); within a class, words are drawn Zipf-distributed, a few frequent and many rare, as in real text;
- phrases: a few templates of word classes ("D N V", "V D N", ...), words separated by " ";
- sentences: phrases joined by ", ", ended by "." and a space, or a newline that ends a paragraph.

    "ka demopi soluta, nirabe ko sateni. ka gupo lirano, ..."

`seed` picks another text of the same language (another lexicon and other sentences). `spaces=False`
(`hmlm data synthetic --no-spaces`) writes the same language with nothing between the words of a phrase,
keeping the phrase punctuation: "kademopisoluta, nirabekosateni. ...". Word boundaries must then be found from
the statistics alone, as in unsupervised word segmentation; the stored true word ends still score them.

Because the structure is known, the true boundaries are stored beside the text: {split}.word.bin and
{split}.phrase.bin, uint8, 1 on the last character of each word / phrase (Dataset.true_boundaries), so the
boundaries a model learns can be scored against them. Splits follow the text8 rule (valid = test = n // 20
from the end). meta.json's "generator" records what made the text ({"version", "seed", "spaces", "chars"}), so
that preparing it again with other settings into the same folder is refused instead of silently kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmlm.data.sources import SPLITS, split_sizes
from hmlm.data.store import ensure_writable, is_prepared, skip_if_prepared, write_dataset
from hmlm.data.tokenize import tokenize
from hmlm.errors import UserError

GENERATOR_VERSION = 1  # bump when the language changes, so a seed names one text
DEFAULT_CHARS = 3_000_000  # about 0.3 s to generate and prepare
CONSONANTS = "bdgklmnprst"
VOWELS = "aeiou"
# class: (number of words, fewest syllables, most syllables)
CLASSES = {"D": (12, 1, 1), "N": (400, 2, 3), "V": (200, 2, 3)}
TEMPLATES = {"D N": 0.25, "D N V": 0.25, "N V": 0.15, "V D N": 0.15, "D N V D N": 0.1, "N N V": 0.1}
ZIPF_EXPONENT = 1.1
SENTENCE_END = 0.4  # probability that a phrase ends its sentence
PARAGRAPH_END = 0.2  # probability that a sentence ends its paragraph (a newline in place of the space)
SEPARATORS = (b" ", b", ", b". ", b".\n")  # after a word: inside a phrase, phrase end, sentence end, paragraph end
NO_SPACES = (b"", *SEPARATORS[1:])  # --no-spaces: nothing between the words of a phrase


@dataclass
class SyntheticText:
    text: bytes  # ASCII
    word_ends: np.ndarray  # (n,) uint8: 1 on the last character of each word
    phrase_ends: np.ndarray  # (n,) uint8: 1 on the last character of each phrase (a subset of word_ends)


def generate(chars: int = DEFAULT_CHARS, seed: int = 0, spaces: bool = True) -> SyntheticText:
    """Exactly `chars` characters of the synthetic language, the same for the same seed. Without `spaces`, the same
    words and sentences (for the same seed) with nothing between the words of a phrase."""
    if chars < 100:
        raise UserError(f"a synthetic text needs at least 100 characters, not {chars}")
    rng = np.random.default_rng(seed)
    lexicon, classes = _lexicon(rng)
    phrases = chars // 8  # a phrase averages about 16 characters: twice what is needed, then cut
    while True:
        text, word_ends, phrase_ends = _sentences(rng, lexicon, classes, phrases, SEPARATORS if spaces else NO_SPACES)
        if len(text) >= chars:
            return SyntheticText(text[:chars], word_ends[:chars], phrase_ends[:chars])
        phrases *= 2


def _lexicon(rng: np.random.Generator) -> tuple[list[bytes], dict[str, np.ndarray]]:
    """Distinct words for every class, and each class's word indices into the lexicon."""
    syllables = [c + v for c in CONSONANTS for v in VOWELS]
    lexicon: list[bytes] = []
    seen: set[bytes] = set()
    classes: dict[str, np.ndarray] = {}
    for name, (count, fewest, most) in CLASSES.items():
        start = len(lexicon)
        while len(lexicon) - start < count:
            n = int(rng.integers(fewest, most + 1))
            word = "".join(syllables[i] for i in rng.integers(len(syllables), size=n)).encode()
            if word not in seen:
                seen.add(word)
                lexicon.append(word)
        classes[name] = np.arange(start, len(lexicon))
    return lexicon, classes


def _sentences(
    rng: np.random.Generator,
    lexicon: list[bytes],
    classes: dict[str, np.ndarray],
    phrases: int,
    separators: tuple[bytes, ...] = SEPARATORS,
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """`phrases` phrases of text, with the word and phrase end marks; `separators` as SEPARATORS."""
    names = list(classes)
    templates = [[names.index(c) for c in t.split()] for t in TEMPLATES]
    lengths = np.array([len(t) for t in templates])
    # (templates, longest) class ids, -1 as padding: one row per template
    table = np.full((len(templates), lengths.max()), -1)
    for row, t in enumerate(templates):
        table[row, : len(t)] = t

    chosen = rng.choice(len(templates), size=phrases, p=list(TEMPLATES.values()))  # (phrases,)
    slots = table[chosen].ravel()
    slots = slots[slots >= 0]  # (words,) the class of every word, phrase after phrase
    last_of_phrase = np.cumsum(lengths[chosen]) - 1  # (phrases,) index of each phrase's last word

    words = np.empty(len(slots), dtype=np.int64)  # (words,) lexicon index
    for c, name in enumerate(names):
        members = classes[name]
        zipf = 1.0 / np.arange(1, len(members) + 1) ** ZIPF_EXPONENT
        where = slots == c
        words[where] = rng.choice(members, size=int(where.sum()), p=zipf / zipf.sum())

    sentence_end = rng.random(phrases) < SENTENCE_END
    paragraph_end = sentence_end & (rng.random(phrases) < PARAGRAPH_END)
    separator = np.zeros(len(words), dtype=np.int64)  # (words,) index into SEPARATORS
    separator[last_of_phrase] = np.where(paragraph_end, 3, np.where(sentence_end, 2, 1))

    pieces: list[bytes] = [b""] * (2 * len(words))  # word, separator, word, separator, ...
    pieces[0::2] = [lexicon[w] for w in words.tolist()]
    pieces[1::2] = [separators[s] for s in separator.tolist()]
    text = b"".join(pieces)

    word_length = np.array([len(w) for w in lexicon])[words]
    separator_length = np.array([len(s) for s in separators])[separator]
    last_char = np.cumsum(word_length + separator_length) - separator_length - 1  # (words,)
    word_ends = np.zeros(len(text), dtype=np.uint8)
    word_ends[last_char] = 1
    phrase_ends = np.zeros(len(text), dtype=np.uint8)
    phrase_ends[last_char[last_of_phrase]] = 1
    return text, word_ends, phrase_ends


def prepare_synthetic(
    data_dir: str | Path = "data",
    force: bool = False,
    chars: int = DEFAULT_CHARS,
    seed: int = 0,
    name: str = "synthetic",
    spaces: bool = True,
) -> Path:
    """Generate the synthetic dataset into DATA_DIR/NAME/ (with its true boundaries) and return the folder."""
    target = Path(data_dir) / name
    generator = {"version": GENERATOR_VERSION, "seed": seed, "spaces": spaces, "chars": chars}
    if not force:
        _refuse_other_settings(target, generator)
    if skip_if_prepared(target, force):
        return target
    ensure_writable(Path(data_dir))
    corpus = generate(chars, seed, spaces)
    sizes = split_sizes(chars)
    bounds = np.cumsum([0] + [sizes[s] for s in SPLITS])
    cut = {s: slice(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}
    codes = np.frombuffer(corpus.text, dtype=np.uint8)
    vocab, ids = tokenize({s: codes[cut[s]] for s in SPLITS}, "chars")
    extra = {}
    for s in SPLITS:
        extra[f"{s}.word.bin"] = corpus.word_ends[cut[s]]
        extra[f"{s}.phrase.bin"] = corpus.phrase_ends[cut[s]]
    spacing = "" if spaces else ", no spaces"
    source = {
        "name": f"hmlm synthetic v{GENERATOR_VERSION} (seed {seed}, {chars:,} characters{spacing})",
        "sha256": hashlib.sha256(corpus.text).hexdigest(),
    }
    return write_dataset(target, vocab, ids, source, extra, {"generator": generator})


def _describe(generator: dict) -> str:
    return f"seed {generator.get('seed', 0)}, " + ("with spaces" if generator.get("spaces", True) else "no spaces")


def _refuse_other_settings(target: Path, generator: dict) -> None:
    """A UserError when TARGET already holds a synthetic text made with another seed or spacing (a folder from
    before meta.json recorded its generator holds seed 0 with spaces, the only text it could make)."""
    if not is_prepared(target):
        return
    try:
        old = json.loads((target / "meta.json").read_text(encoding="utf-8")).get("generator") or {}
    except (OSError, ValueError, AttributeError):
        return  # unreadable: skip_if_prepared and open_dataset say what to do
    old = {"seed": 0, "spaces": True} | old
    if (old["seed"], old["spaces"]) != (generator["seed"], generator["spaces"]):
        raise UserError(
            f"{target} holds the synthetic text of {_describe(old)}, not {_describe(generator)}: pass --force to "
            f"replace it, or --data-dir DIR to prepare this one elsewhere"
        )
