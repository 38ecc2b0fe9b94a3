"""Read the files a dataset needs out of an archive (zip or tar) or a folder, safely and in one pass.

Only the needed members are read, straight from the archive into memory; nothing else is written anywhere.
Still, every member's path is checked as if it were to be extracted into a folder (tar members through
tarfile's `data` extraction filter, zip names by the same rules): an archive holding a path that would escape
that folder (`../x`, a link pointing outside) is not the official archive, and is refused as a whole.
"""

from __future__ import annotations

import lzma
import posixpath
import re
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from hmlm.errors import UserError

# What a damaged compressed stream raises while it is read.
_READ_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    OSError,  # gzip and bz2 errors are OSErrors
    NotImplementedError,  # a zip compression method Python lacks
    ValueError,  # tarfile: bad header fields in a damaged archive
)


ESCAPES = "its path escapes the folder it would be extracted to"


class CorruptArchive(UserError):
    """The archive cannot be read to the end (truncated download, wrong file)."""


def read_members(source: Path, filenames: Sequence[str]) -> dict[str, bytes]:
    """The content of each of `filenames`, found by file name anywhere inside `source`.

    source: a zip or tar archive (any compression tarfile reads), or a folder holding the extracted files.
    """
    if source.is_dir():
        return _read_folder(source, filenames)
    if zipfile.is_zipfile(source):
        return _read_zip(source, filenames)
    try:
        is_tar = tarfile.is_tarfile(source)
    except OSError:
        is_tar = False
    if not is_tar:
        raise CorruptArchive(f"{source} is truncated or corrupt (not a readable zip or tar archive)")
    return _read_tar(source, filenames)


def _read_zip(path: Path, filenames: Sequence[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:  # check every name before reading anything
                if _escapes(info.filename):
                    _refuse(path, info.filename, ESCAPES)
            for info in infos:
                name = posixpath.basename(info.filename.replace("\\", "/"))
                if name in filenames and not info.is_dir():
                    _add(found, name, path)
                    found[name] = archive.read(info)  # checks the member's CRC-32
    except _READ_ERRORS as error:
        raise CorruptArchive(f"{path} is truncated or corrupt ({_describe(error)})") from None
    return _complete(found, filenames, path)


def _read_tar(path: Path, filenames: Sequence[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    unsafe: tuple[str, str] | None = None  # the first unsafe member and why
    # The folder the data filter judges paths against; nothing is ever extracted there.
    root = str(path.parent / (path.name + ".extracted"))
    try:
        with tarfile.open(path, "r:*") as archive:
            # One pass over the (compressed) stream: a member is read when iteration reaches it. The whole
            # archive is read to the end, so a truncated one fails here even when the needed members came early.
            for member in archive:
                reason = _unsafe_tar_member(member, root)
                if reason is not None:
                    unsafe = unsafe or (member.name, reason)
                    continue
                name = posixpath.basename(member.name)
                if name in filenames and member.isfile():
                    _add(found, name, path)
                    found[name] = archive.extractfile(member).read()
    except _READ_ERRORS as error:
        raise CorruptArchive(f"{path} is truncated or corrupt ({_describe(error)})") from None
    if unsafe is not None:
        _refuse(path, *unsafe)
    return _complete(found, filenames, path)


def _read_folder(folder: Path, filenames: Sequence[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for name in filenames:
        hits = sorted(p for p in folder.rglob(name) if p.is_file())
        if len(hits) > 1:
            listed = ", ".join(str(p) for p in hits[:3])
            raise UserError(f"{folder} holds {len(hits)} files named {name} ({listed}): pass a folder with one")
        if hits:
            try:
                found[name] = hits[0].read_bytes()
            except OSError as error:
                raise UserError(f"cannot read {hits[0]} ({error.strerror or error})") from None
    return _complete(found, filenames, folder)


def _unsafe_tar_member(member: tarfile.TarInfo, root: str) -> str | None:
    """Why the tar `data` filter (PEP 706) would refuse to extract `member` into `root`, or None."""
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is None:  # Python before 3.10.12 / 3.11.4: the filter's path rules, by hand
        target = member.linkname if (member.issym() or member.islnk()) else ""
        if _escapes(member.name) or (target and _escapes(posixpath.join(member.name, "..", target))):
            return ESCAPES
        return "a device or other special file" if not (member.isfile() or member.isdir() or target) else None
    try:
        data_filter(member, root)
    except (tarfile.OutsideDestinationError, tarfile.AbsolutePathError):
        return ESCAPES
    except (tarfile.LinkOutsideDestinationError, tarfile.AbsoluteLinkError):
        return "a link to outside the folder"
    except tarfile.SpecialFileError:
        return "a device or other special file"
    except tarfile.FilterError as error:
        return str(error)
    return None


def _escapes(name: str) -> bool:
    """True when an archive path would land outside the folder it is extracted into."""
    name = name.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return True
    depth = 0
    for part in PurePosixPath(name).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def _refuse(archive: Path, member: str, reason: str) -> None:
    raise UserError(
        f"{archive} holds an unsafe member ({member!r}: {reason}): refusing the archive; "
        "it is not the official one, so download that or pass another --source"
    )


def _add(found: dict[str, bytes], name: str, archive: Path) -> None:
    if name in found:
        raise UserError(f"{archive} holds two files named {name}: pass an archive or folder with one")


def _complete(found: dict[str, bytes], filenames: Sequence[str], source: Path) -> dict[str, bytes]:
    missing = [name for name in filenames if name not in found]
    if missing:
        raise UserError(
            f"{source} has no file named {', '.join(missing)}: pass the official archive, "
            "or a folder holding these files, with --source"
        )
    return found


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
