"""Download one file over HTTP(S): streamed to disk with a progress bar, resumable, retried, atomic.

The bytes go to `DEST.part`; only a complete file is renamed to DEST, so DEST is never a partial download.
When a connection drops or stalls, the next attempt asks the server for the rest with a Range request and
appends to the `.part` file; the same happens on the next run after Ctrl-C or a failure. A server that
ignores Range (answers 200) makes the download start over, which is slower but still right.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from hmlm.errors import UserError

TIMEOUT = 30.0  # seconds without progress (connecting, or between two reads) before an attempt gives up
RETRIES = 3  # further attempts after the first fails; each resumes where the previous one stopped
RETRY_WAIT = 1.0  # seconds before the first retry, doubled for each next one
CHUNK = 1 << 20  # bytes per read

USER_AGENT = "hmlm-data/1 (Python urllib)"
URL_SCHEMES = ("http://", "https://", "ftp://", "file://")


class _Retry(Exception):
    """A failure that another attempt may get past (a dropped or refused connection, a 5xx answer)."""


def is_url(text: str) -> bool:
    return text.lower().startswith(URL_SCHEMES)


def download(url: str, dest: Path) -> Path:
    """Fetch `url` into `dest` (a no-op when `dest` exists) and return `dest`."""
    if dest.exists():
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create {dest.parent} ({error.strerror or error}): choose another --data-dir") from None
    part = dest.with_name(dest.name + ".part")
    reason = ""
    for attempt in range(RETRIES + 1):
        if attempt:
            time.sleep(RETRY_WAIT * 2 ** (attempt - 1))
        try:
            _attempt(url, part)
        except _Retry as error:
            reason = str(error)
            continue
        os.replace(part, dest)
        return dest
    kept = part.stat().st_size if part.exists() else 0
    then = (
        f"the {kept:,} bytes received are kept in {part}: run the same command again to resume"
        if kept
        else "check the network and the URL, or pass --source with a mirror URL, an archive or a folder"
    )
    raise UserError(f"cannot download {url} ({reason}, {RETRIES + 1} tries): {then}")


def _attempt(url: str, part: Path) -> None:
    """One request: append the rest of the file to `part`; raises _Retry when it stops short."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # nothing left to send: `part` may already be the whole file
            total = _content_range_total(error.headers.get("Content-Range", ""))
            if total == have:
                return
            part.unlink()  # not a prefix of this file after all: start over on the next attempt
            raise _Retry("the partial download does not match the file on the server") from None
        if error.code in (408, 429) or error.code >= 500:
            raise _Retry(f"HTTP {error.code} {error.reason}") from None
        raise UserError(
            f"cannot download {url}: HTTP {error.code} {error.reason}: check the URL, "
            "or pass --source with a mirror URL, an archive or a folder"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Retry(_reason(error)) from None

    with response:
        status = getattr(response, "status", None)
        if have and status == 206:
            if _content_range_start(response.headers.get("Content-Range", "")) != have:
                part.unlink()
                raise _Retry("the server answered the Range request with another part of the file")
            mode = "ab"
        else:  # a fresh start, or the server ignored the Range header and sends the whole file
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        try:
            with (
                open(part, mode) as file,
                tqdm(
                    total=total,
                    initial=have,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name.removesuffix(".part"),
                    disable=None,  # no bar when stderr is not a terminal (logs, CI)
                ) as bar,
            ):
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as error:  # timeout, reset mid-body
                        raise _Retry(_reason(error)) from None
                    if not chunk:
                        break
                    file.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
        except OSError as error:  # writing: a full disk, a folder that went away
            raise UserError(f"cannot write {part} ({error.strerror or error})") from None
    # http.client returns b"" (no exception) when the server closes early, so compare with Content-Length.
    if total is not None and have < total:
        raise _Retry(f"the connection closed after {have:,} of {total:,} bytes")


def _reason(error: BaseException) -> str:
    """A short human reason: "Connection refused", "timed out", ..."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error.reason, str):
        error = error.reason
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def _content_range_start(header: str) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", header)
    return int(match.group(1)) if match else None


def _content_range_total(header: str) -> int | None:
    match = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", header)
    return int(match.group(1)) if match else None
