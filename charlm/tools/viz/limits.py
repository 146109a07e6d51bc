"""How long a text ``charlm viz`` traces: the bound and its check (no torch here: the command's options read
the bound when ``charlm viz --help`` is shown)."""

from __future__ import annotations

from charlm.util.errors import CharlmError

MAX_CHARS = 20_000  # the default bound on a traced text


def check_length(text: str, max_chars: int = MAX_CHARS, what: str = "the text") -> None:
    """One clear error for a text too short or too long to trace."""
    if len(text) < 1:
        raise CharlmError(f"{what} is empty; give at least one character")
    if len(text) > max_chars:
        raise CharlmError(f"{what} has {len(text):,} characters, more than the limit of {max_chars:,}; "
                          f"use a shorter text or raise the limit (--max-chars)")
