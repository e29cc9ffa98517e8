"""The one exception type users see as a clean one-line message, the one place that prints it, and how any
file name is made printable (``display_name``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class VitlabError(Exception):
    """A problem with the user's input, data or environment that has a clear, actionable message."""


def display_name(name: str) -> str:
    """``name`` as text any terminal, UTF-8 file or JSON parser takes: a byte that was not valid UTF-8
    (``os.fsdecode``'s surrogate escape) as ``\\xNN``, another unprintable character (a tab, a newline, an
    escape sequence, a lone surrogate) as Python writes it in a string (``\\t``, ``\\n``, ``\\x1b``,
    ``\\udc80``); everything else, any printable Unicode, as it is.

    A Latin-1 ``café`` (bytes ``caf\\xe9``) shows as ``caf\\xe9``; a name with a tab or newline cannot split a
    line of ``vitlab predict``'s output.
    """
    return "".join(
        char
        if char.isprintable()
        else f"\\x{ord(char) - 0xDC00:02x}"
        if 0xDC80 <= ord(char) <= 0xDCFF
        else repr(char)[1:-1]
        for char in name
    )


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when the message is empty)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_code(action: Callable[[], object]) -> int:
    """Run ``action`` as a command: 0 when it returns; a VitlabError or OSError (disk full, permissions: one
    the library did not anticipate) is printed as one line on stderr and gives 2, Ctrl-C gives 130.

    With ``VITLAB_DEBUG=1`` (``vitlab --debug``) the error propagates with its traceback instead.
    """
    try:
        action()
    except (VitlabError, OSError) as error:
        if os.environ.get("VITLAB_DEBUG"):
            raise
        _say(f"error: {display_name(one_line(error))}")
        return 2
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    return 0


def _say(line: str) -> None:
    # One write for the whole line: print() writes the text and its newline separately, so the error lines of
    # torchrun's processes, which share one stderr, could interleave into one line.
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
