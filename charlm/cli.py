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
app.command(cls=TrainCommand)(train)
app.command("eval")(evaluate)
app.command()(sample)
app.command("data")(data_)
app.command()(cells)
app.command()(compare)
app.command()(serve)
app.command()(env)
app.command()(viz)
app.command()(gradients)
app.command()(export)
app.command()(tune)


def main() -> None:
    app()
