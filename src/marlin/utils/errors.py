"""Errors as one line: what index rows, error lists and the CLI show instead of a traceback."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(err: BaseException) -> str:
    """The first non-empty line of an error's message (its type name when it has none); for an error re-raised from
    a DataLoader worker (its text carries the worker's traceback), the original exception's message."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if "Original Traceback" in text and lines:
        last = lines[-1]
        head, sep, rest = last.partition(": ")
        return rest if sep and " " not in head else last
    return lines[0] if lines else type(err).__name__
