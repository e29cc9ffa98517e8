"""Atomic file writes: an output is either the previous good file or the complete new one, never half; and
where the project's own files are (``project_root``), also from inside a DVC experiment's temporary copy."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitlab.errors import VitlabError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it is fsynced and renamed over ``target``.

    The temporary file lives in the same folder so the final ``os.replace`` is an atomic rename. On any
    error the temporary file is removed and ``target`` is left as it was. An OSError on the way (disk full,
    read-only or missing folder) becomes a one-line VitlabError naming ``target``: every output of every
    stage is written here, so this is the one place that reports it.
    """
    target = Path(target)
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make outputs unreadable to others
        os.replace(tmp, target)
    except OSError as error:
        raise VitlabError(f"cannot write {target}: {error.strerror or error}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def fresh_folder(folder: str | os.PathLike[str]) -> Path:
    """Empty ``folder`` (creating it), so that it holds only what the caller writes next: a stage whose
    output is a folder calls this first, as ``dvc repro`` would have removed it, so that a CNN's gradcam.png
    never sits beside a ViT's stale layer_*.png from a run before. Returns it as a Path.

    An OSError on the way (permissions, a file in the folder's place) is a VitlabError naming ``folder``.
    """
    folder = Path(folder)
    try:
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink(missing_ok=True)
        folder.mkdir(parents=True)
    except OSError as error:
        raise VitlabError(f"cannot empty {folder}: {error.strerror or error}") from None
    return folder


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | os.PathLike[str], data: bytes | memoryview) -> None:
    """Write ``data`` to ``target`` atomically (``atomic_path``); a failed write: VitlabError naming it."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``target`` atomically as UTF-8, line ends as given; errors as ``write_bytes``."""
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` atomically as JSON: 2-space indent, keys in insertion order, a final newline.

    A payload json cannot encode raises TypeError before ``target`` is touched; float NaN/inf are written
    as the non-standard ``NaN``/``Infinity`` (json's default), not refused.
    """
    write_text(target, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_tsv(target: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Write rows of equal keys as a tab-separated table (the format ``dvc plots`` reads)."""
    if not rows:
        raise ValueError(f"refusing to write an empty table to {target}")
    columns = list(rows[0])
    lines = ["\t".join(columns)]
    lines += ["\t".join(_format_cell(row[c]) for c in columns) for row in rows]
    write_text(target, "\n".join(lines) + "\n")


def write_csv(target: str | os.PathLike[str], header: list[str], rows: list[tuple]) -> None:
    """Write a header and rows as CSV with ``\\n`` line ends (what ``dvc plots`` and pandas read)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(target, buffer.getvalue())


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def project_root(cwd: str | os.PathLike[str] | None = None) -> Path:
    """The project whose files ``cwd`` (default: the working directory) holds, as an absolute path.

    That is ``cwd`` itself, except in a DVC experiment run in a temporary copy of the repository
    (``ROOT/.dvc/tmp/exps/...``: ``dvc exp run --temp``, ``dvc queue``, ``vitlab compare --run``): there it
    is ROOT, the repository the copy was made from, which holds the user's untracked files and outlives the
    copy (DVC deletes it when the experiment ends).
    """
    cwd = Path.cwd() if cwd is None else Path(cwd).absolute()
    for folder in (cwd, *cwd.parents):
        if (folder.name, folder.parent.name, folder.parent.parent.name) == ("exps", "tmp", ".dvc"):
            return folder.parents[2]
    return cwd
