"""`hmlm data ptb|text8|enwik8|synthetic`: fetch, verify, tokenize and write a dataset of the registry.

The steps, each in its own module: find the archive (download.py: the official URL, a mirror, or a local
archive or folder given with --source), read the needed members (extract.py), check them against the
official checksums (sources.py), cut the splits and tokenize (tokenize.py), write DATA_DIR/NAME/
atomically (store.py).

meta.json's source.sha256 is the sha256 of the member files' bytes, concatenated in the registry's order
(PTB: train, valid, test), so it names the data itself and is the same whichever way it arrived.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from hmlm.data.download import download, is_url
from hmlm.data.extract import CorruptArchive, read_members
from hmlm.data.messages import info, warn
from hmlm.data.sources import SOURCES, SPLITS, Source, check_name, split_sizes
from hmlm.data.store import ensure_writable, skip_if_prepared, write_dataset
from hmlm.data.tokenize import text_codes, tokenize
from hmlm.data.vocab import Vocab
from hmlm.errors import UserError


def prepare_dataset(
    name: str,
    data_dir: str | Path = "data",
    source: str | None = None,
    verify: bool = True,
    force: bool = False,
    seed: int | None = None,
    spaces: bool = True,
) -> Path:
    """Prepare the registry dataset `name` in DATA_DIR/NAME/ and return that folder.

    source: None for the official URL, or a mirror URL, a downloaded archive, or a folder holding the
    extracted member files. verify: check the official checksums (and PTB's token counts); False only warns.
    force: rebuild even when the dataset is already prepared. seed (another text of the same language) and
    spaces=False (no separator between the words of a phrase) are for `synthetic` only.
    """
    check_name(name)
    data_dir = Path(data_dir)
    if name == "synthetic":
        from hmlm.data.synthetic import prepare_synthetic

        if source is not None:
            raise UserError("the synthetic dataset is generated here: it takes no --source")
        return prepare_synthetic(data_dir, force=force, seed=seed or 0, spaces=spaces)
    if seed is not None or not spaces:
        flag = "--seed" if seed is not None else "--no-spaces"
        raise UserError(f"{flag} is for `hmlm data synthetic` only, not for {name}")

    target = data_dir / name
    if skip_if_prepared(target, force):
        return target
    ensure_writable(data_dir)
    spec = SOURCES[name]
    members, origin = _fetch_members(spec, data_dir, source, verify)
    if spec.kind == "ptb":
        vocab, ids = _tokenize_ptb(spec, members, verify)
    else:
        vocab, ids = _tokenize_one_file(spec, members[spec.members[0].filename])
    digest = hashlib.sha256()
    for member in spec.members:
        digest.update(members[member.filename])
    return write_dataset(target, vocab, ids, {"name": origin, "sha256": digest.hexdigest()})


def _fetch_members(spec: Source, data_dir: Path, source: str | None, verify: bool) -> tuple[dict[str, bytes], str]:
    """The member files' bytes, checked (unless verify is False), and the name of where they came from."""
    if source is None or is_url(source):
        url = source or spec.url
        archive = data_dir / "downloads" / spec.archive
        if archive.exists():
            info(f"using {archive}, downloaded before")
        else:
            info(f"downloading {url} to {archive}")
            download(url, archive)
        where, origin, cached = archive, url, True
    else:
        where = Path(source).expanduser()
        if not where.exists():
            raise UserError(f"--source {source}: no such file or folder (and not an http:// or https:// URL)")
        origin, cached = where.name, False

    filenames = [m.filename for m in spec.members]
    try:
        members = read_members(where, filenames)
    except CorruptArchive as error:
        if not cached:
            raise UserError(f"{error}: download it again, or pass another --source") from None
        where.unlink()  # useless as it is, and it would be found again by the next run
        raise UserError(f"{error}: it was removed; run the command again to download it afresh") from None

    if verify:
        _verify_checksums(spec, members, where, cached)
    else:
        warn("--no-verify: the files are not checked against the official checksums")
    return members, origin


def _verify_checksums(spec: Source, members: dict[str, bytes], where: Path, cached: bool) -> None:
    for member in spec.members:
        for algorithm, expected in (("sha1", member.sha1), ("sha256", member.sha256)):
            if expected is None:
                continue
            actual = hashlib.new(algorithm, members[member.filename]).hexdigest()
            if actual != expected:
                keep = f"; delete {where} to download it again" if cached else ""
                raise UserError(
                    f"checksum mismatch: {member.filename} from {where} has {algorithm.upper()} {actual}, "
                    f"the official file {expected}{keep}, or pass --no-verify to use it as it is"
                )


def _tokenize_ptb(spec: Source, members: dict[str, bytes], verify: bool) -> tuple[Vocab, dict[str, np.ndarray]]:
    codes = {m.split: _ptb_codes(members[m.filename], m.filename) for m in spec.members}
    vocab, ids = tokenize(codes, "chars", space="_")
    if verify:  # PTB has no published checksum for train: its token counts (and vocabulary) are the check
        for member in spec.members:
            got = len(ids[member.split])
            if got != member.tokens:
                raise UserError(
                    f"{member.filename} has {got:,} tokens, the official file {member.tokens:,}: "
                    "pass the official archive, or --no-verify to use it as it is"
                )
        if len(vocab) != spec.vocab_size:
            raise UserError(
                f"the PTB files have {len(vocab)} symbols, the official ones {spec.vocab_size}: "
                "pass the official archive, or --no-verify to use it as it is"
            )
    return vocab, ids


def _ptb_codes(data: bytes, filename: str) -> np.ndarray:
    """PTB's character-level file as (n,) uint8 codes: the space-separated symbols, the newline kept as the
    end-of-line token. Every symbol is one character (`<unk>` is spelled `< u n k >`), so the tokens are
    simply the bytes that are not spaces."""
    raw = np.frombuffer(data, dtype=np.uint8)
    symbol = raw != ord(" ")
    # Two symbol bytes side by side would be a multi-character symbol: not the character-level file.
    glued = np.flatnonzero(symbol[1:] & symbol[:-1])
    if len(glued) or not data.isascii():
        at = int(glued[0]) if len(glued) else 0
        raise UserError(
            f"{filename} is not PTB's character-level text (single ASCII characters separated by spaces; "
            f"see byte {at:,}): pass the official archive with --source, or use `hmlm data text`"
        )
    return raw[symbol]


def _tokenize_one_file(spec: Source, data: bytes) -> tuple[Vocab, dict[str, np.ndarray]]:
    """text8 / enwik8: one file, cut into train, valid and test by the registry's rule."""
    if spec.kind == "bytes":  # enwik8 is modelled byte by byte
        codes = np.frombuffer(data, dtype=np.uint8)
    else:
        try:  # text8 is ASCII: its bytes are its characters
            codes = text_codes(data)
        except UnicodeDecodeError as error:
            raise UserError(
                f"{spec.members[0].filename} is not UTF-8 text (byte offset {error.start:,}): pass the official archive"
            ) from None
    sizes = split_sizes(len(codes))
    bounds = np.cumsum([0] + [sizes[s] for s in SPLITS])  # (4,) where each split starts, and the end
    return tokenize({s: codes[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}, spec.kind)
