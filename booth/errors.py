"""The one exception type for problems the user can fix, and how other exceptions are quoted in it."""

from __future__ import annotations


class BoothError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


def first_line(e: BaseException, limit: int | None = 300) -> str:
    """An exception's message cut to one line (and `limit` characters), for a one-line error; its type's name if
    it has none."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
