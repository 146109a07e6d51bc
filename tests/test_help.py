"""``charlm --help`` and every command's ``--help`` read well at 80 and 120 columns: Rich wraps every text to the
width, and no line ends early because the source text had a line break there (a "hard-wrapped fragment")."""

from __future__ import annotations

import itertools
import re

import pytest
from typer.testing import CliRunner

from charlm.cli import app, help_text

COMMANDS = ["train", "eval", "sample", "data", "cells", "compare", "serve", "env", "viz", "gradients", "export",
            "tune"]
_GAP = re.compile(r"\S(\s{2,})\S")


def text_column(inner: str) -> int:
    """Where the last column of a panel row starts (name, type, then the help, 2 or more spaces apart)."""
    gaps = list(_GAP.finditer(inner))
    return gaps[-1].end(1) if gaps else len(inner) - len(inner.lstrip())


def fragments(screen: str) -> list[str]:
    """Lines that end although the next line's first word would have fitted after them."""
    found = []
    lines = screen.splitlines()
    for line, after in itertools.pairwise(lines):
        boxed = line.startswith("│") and after.startswith("│")
        inner, nxt = (line[1:-1], after[1:-1]) if boxed else (line, after)
        if not inner.strip() or not nxt.strip():
            continue
        start = text_column(inner)
        indent = len(nxt) - len(nxt.lstrip())
        if indent != start or (boxed and text_column(nxt) != indent):
            continue  # the next line starts a new entry, not a continuation of this one
        word = nxt.split()[0]
        if word.startswith("["):
            continue  # Typer's [default: ...] / [required] go on a line of their own once the help wraps
        if len(inner.rstrip()) + 1 + len(word) <= len(inner) - 1:  # Rich pads every line to the width, less one
            found.append(f"{line.strip()!r} then {after.strip()!r}")
    return found


def test_the_finder_sees_a_fragment() -> None:
    screen = "\n".join([
        "│ serve      Serve a page to type a prime, set temperature / top-k / top-p /   │",
        "│            length, and watch the text stream in,                             │",
        "│            coloured by surprisal.                                            │",
        "│ env        Versions.                                                         │"])
    assert fragments(screen) == [
        "'│            length, and watch the text stream in,                             │' then "
        "'│            coloured by surprisal.                                            │'"]


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_has_no_hard_wrapped_fragments(command: str | None, columns: int) -> None:
    result = CliRunner().invoke(app, [*([command] if command else []), "--help"], env={"COLUMNS": str(columns)},
                                terminal_width=columns)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= columns
    assert fragments(result.output) == []


def test_help_text_joins_each_paragraph() -> None:
    def command() -> None:
        """One line
        of summary.

        Then the details,
        also joined."""

    assert help_text(command) == "One line of summary.\n\nThen the details, also joined."
