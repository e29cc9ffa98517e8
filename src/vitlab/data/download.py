"""Fetch an archive from an http(s) URL, a file:// URL or a local path into an md5-verified cache file.

The destination only ever appears complete and verified: bytes arrive in ``<dest>.part`` (resumed with an
HTTP Range request after an interruption) and are renamed onto ``dest`` once their md5 matches.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from vitlab.errors import VitlabError
from vitlab.files import project_root

_CHUNK = 1 << 20
_TIMEOUT_S = 30  # per blocking socket operation (connect, each read), not for the whole download
_ATTEMPTS = 5  # an interrupted download is resumed at once while each attempt makes progress
_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def md5sum(path: str | os.PathLike[str]) -> str:
    """Hex md5 of a file, read in chunks."""
    with open(path, "rb") as handle:
        # usedforsecurity=False: md5 is a checksum here, and FIPS-mode Pythons refuse it otherwise.
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def local_source(source: str) -> str:
    """``source`` (data.source) as the download reads it. A relative path is the project's: relative to the
    working directory, or where that has no such file, to ``project_root``, which is where a DVC experiment
    run in a temporary copy of the repository finds the user's untracked archive or folder. A URL or an
    absolute path is returned as given.

    Raises VitlabError naming every folder looked in when none has the file.
    """
    if urlparse(source).scheme or Path(source).is_absolute() or Path(source).exists():
        return source
    places = list(dict.fromkeys([Path.cwd(), project_root()]))
    found = [place / source for place in places if (place / source).exists()]
    if not found:
        looked = " and ".join(str(place) for place in places)
        raise VitlabError(f"data.source: {source}: no such file or folder (looked in {looked})")
    return str(found[0])


def source_name(source: str) -> str:
    """The file name at the end of a URL or path (``""`` when it has none, e.g. ``https://host/``)."""
    if _is_url(source):
        return PurePosixPath(unquote(urlparse(source).path)).name
    return Path(source).name


def fetch(source: str, dest: str | os.PathLike[str], md5: str | None, progress: bool = True) -> Path:
    """Make ``dest`` a copy of ``source`` whose md5 is ``md5``, downloading only when needed.

    ``source`` is an http(s) URL, a file:// URL or a local path. A ``dest`` that already has the right md5
    is kept as is (the cache); one with another md5 is fetched again. With ``md5`` None nothing is checked
    here (the caller verifies the content) and ``source`` is always fetched again, since no cached copy can
    be told from another. Raises VitlabError when the source cannot be read or its md5 differs (the bad
    download is deleted; an interrupted one is kept to resume).
    """
    dest = Path(dest)
    md5 = md5.lower() if md5 else None
    if md5 and dest.is_file() and md5sum(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    show = progress and sys.stderr.isatty() and not os.environ.get("CI")
    scheme = urlparse(source).scheme
    if scheme in ("http", "https"):
        _download(source, part, show)
    elif scheme in ("", "file"):
        _copy(source, part, show)
    else:
        raise VitlabError(f"{source}: unsupported URL scheme {scheme!r} (use http(s)://, file:// or a path)")
    actual = md5sum(part) if md5 else None
    if actual != md5:
        part.unlink()
        raise VitlabError(f"{source}: md5 mismatch, expected {md5}, got {actual}; the download was deleted")
    os.replace(part, dest)
    return dest


def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https", "file")


def _copy(source: str, part: Path, show: bool) -> None:
    path = Path(urllib.request.url2pathname(urlparse(source).path) if _is_url(source) else source)
    if not path.is_file():
        raise VitlabError(f"{source}: no such file")
    with open(path, "rb") as handle, open(part, "wb") as out:
        _stream(handle, out, path.name, 0, os.fstat(handle.fileno()).st_size, show)


def _download(url: str, part: Path, show: bool) -> None:
    """Download ``url`` into ``part``, resuming from what ``part`` holds; retry while attempts progress."""
    for attempt in range(1, _ATTEMPTS + 1):
        before = _size(part)
        try:
            _download_once(url, part, show)
            return
        except urllib.error.HTTPError as error:
            raise VitlabError(f"{url}: HTTP error {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise VitlabError(f"{url}: cannot connect ({error.reason})") from None
        except (OSError, http.client.HTTPException) as error:
            if attempt == _ATTEMPTS or _size(part) <= before:
                reason = str(error) or type(error).__name__
                raise VitlabError(
                    f"{url}: download interrupted after {_size(part)} bytes ({reason}); run again to resume"
                ) from None


def _download_once(url: str, part: Path, show: bool) -> None:
    offset = _size(part)
    headers = {"User-Agent": "vitlab"} | ({"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not offset:
            raise
        # Range not satisfiable: the .part is not a prefix of this file, so start over.
        part.unlink()
        return _download_once(url, part, show)
    with response:
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if not match or int(match[1]) != offset:
                part.unlink()
                raise VitlabError(f"{url}: the server answered a resume request with the wrong byte range")
            total = int(match[2]) if match[2] != "*" else None
        else:  # a server that ignores Range sends the whole file
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length else None
        with open(part, "ab" if offset else "wb") as out:
            received = _stream(response, out, source_name(url), offset, total, show)
    if total is not None and received < total:
        # http.client returns a short body silently when the connection drops; count the bytes instead.
        raise ConnectionError(f"connection closed after {received} of {total} bytes")


def _stream(src: BinaryIO, out: BinaryIO, name: str, offset: int, total: int | None, show: bool) -> int:
    """Copy ``src`` to ``out`` in chunks with a progress bar; return the bytes ``out`` holds in the end."""
    with tqdm(
        desc=name, total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, disable=not show
    ) as bar:
        while chunk := src.read(_CHUNK):
            try:
                out.write(chunk)
            except OSError as error:  # disk full: not an interrupted download, so not retried
                raise VitlabError(f"cannot write {out.name}: {error.strerror or error}") from None
            bar.update(len(chunk))
            offset += len(chunk)
    return offset


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0
