"""The ``charlm`` command line (Typer): each command lives in ``charlm/commands/<name>.py``; this module
gathers them into one app.

Every user error is a :class:`CharlmError`, printed as one red line on stderr with exit code 2
(``charlm.commands.common.friendly``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import typer

from charlm.commands.cells import cells
from charlm.commands.compare import compare
from charlm.commands.data import data_
from charlm.commands.env import env
from charlm.commands.evaluate import evaluate
from charlm.commands.export import export
from charlm.commands.gradients import gradients
from charlm.commands.sample import sample
from charlm.commands.serve import serve
from charlm.commands.train import TrainCommand, train
from charlm.commands.tune import tune
from charlm.commands.viz import viz

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Character-level recurrent language models of Shakespeare, AWD-LSTM style.")


def help_text(command: Callable[..., object]) -> str:
    """A command's docstring with each paragraph on one line: Rich wraps the help to the terminal's width, and a
    line break kept from the source would break a sentence in the middle (the first paragraph is the short help
    of ``charlm --help``)."""
    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in paragraphs)


for name, command, kwargs in [
    ("train", train, {"cls": TrainCommand}), ("eval", evaluate, {}), ("sample", sample, {}), ("data", data_, {}),
    ("cells", cells, {}), ("compare", compare, {}), ("serve", serve, {}), ("env", env, {}), ("viz", viz, {}),
    ("gradients", gradients, {}), ("export", export, {}), ("tune", tune, {}),
]:
    app.command(name, help=help_text(command), **kwargs)(command)


STDOUT_CLOSED = ("standard output is closed, so charlm has nowhere to write its output; send it to a file or to "
                 "/dev/null instead of closing it (>&-)")


def main() -> None:
    if sys.stdout is None:  # started with stdout closed (`charlm ... >&-`): Python then has no sys.stdout
        if sys.stderr is not None:
            print(f"error: {STDOUT_CLOSED}", file=sys.stderr)
        sys.exit(2)
    app()
