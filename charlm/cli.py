"""The ``charlm`` command line (Typer): each command lives in ``charlm/commands/<name>.py``; this module
gathers them into one app.

Every user error is a :class:`CharlmError`, printed as one red line on stderr with exit code 2
(``charlm.commands.common.friendly``).
"""

from __future__ import annotations

import typer

from charlm.commands.cells import cells
from charlm.commands.compare import compare
from charlm.commands.data import data_
from charlm.commands.evaluate import evaluate
from charlm.commands.sample import sample
from charlm.commands.train import TrainCommand, train
from charlm.commands.tune import tune

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Character-level recurrent language models of Shakespeare, AWD-LSTM style.")
app.command(cls=TrainCommand)(train)
app.command("eval")(evaluate)
app.command()(sample)
app.command("data")(data_)
app.command()(cells)
app.command()(compare)
app.command()(tune)


def main() -> None:
    app()
