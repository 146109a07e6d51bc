"""``charlm compare --rebuild``: a comparison's tables written again from its run records, nothing trained.

``results.json`` holds the settings and every run's scores and curve, so the tables (``results.csv``,
``runs.csv``, ``results.json``, ``results.md``) and ``curves.png`` can be made again under the rules of this
version of charlm, for instance the divergence rule (:mod:`~charlm.tools.compare.summary`), by the same code that
writes them after training (:func:`~charlm.tools.compare.tables.write_results`).

Records made before charlm kept each run's vocabulary size V (which the divergence rule needs) get it back from
the run's parameter count: the model's count is an affine function of V (embedding and decoder rows) for its
cell and sizes, so V is the one whole number that gives the recorded count exactly.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from charlm.config import Config, from_dict
from charlm.tools.compare.plan import Entry, parameter_count
from charlm.tools.compare.plot import plot_runs
from charlm.tools.compare.records import RunResult
from charlm.tools.compare.significance import significance_table
from charlm.tools.compare.summary import CellSummary, summarize
from charlm.tools.compare.tables import print_table, render_table, write_results
from charlm.util.errors import CharlmError

RESULTS = "results.json"


def read_results(folder: Path) -> dict[str, Any]:
    """The comparison's ``results.json``, checked for what a rebuild needs."""
    path = folder / RESULTS
    if not path.is_file():
        raise CharlmError(f"{path} does not exist; --rebuild needs the folder of a comparison (its --out)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CharlmError(f"cannot read {path} ({exc}); --rebuild needs a comparison's results file") from None
    settings = document.get("settings") if isinstance(document, dict) else None
    needed = ("cells", "seeds", "hidden_sizes", "config_values")
    missing = [k for k in needed if not isinstance(settings, dict) or k not in settings]
    if missing or not isinstance(document.get("runs"), list):
        what = ", ".join(f"settings.{k}" for k in missing) or "runs"
        raise CharlmError(f"{path} is not a charlm compare results file (it has no {what}); --rebuild needs one "
                          "written by charlm compare")
    return document


def vocab_size_of(run: RunResult, base: Config) -> int:
    """The vocabulary size that gives ``run``'s model (its cell and hidden size in ``base``) its recorded count."""
    model = dataclasses.replace(base.model, cell=run.cell, hidden_size=run.hidden_size)
    one, two = parameter_count(model, 1), parameter_count(model, 2)
    v, extra = divmod(run.parameters - one, two - one)
    if extra or v < 0 or parameter_count(model, v + 1) != run.parameters:
        raise CharlmError(f"the record of run {run.run_dir} ({run.parameters:,} parameters) fits no vocabulary size "
                          f"for {run.cell} at hidden size {run.hidden_size}; its settings do not match its scores")
    return v + 1


def rebuild(folder: Path, console: Console | None = None) -> tuple[list[CellSummary], list[Path]]:
    """Write the comparison's tables in ``folder`` again from its ``results.json``; returns the summaries and the
    files written (``curves.png`` too, where matplotlib is installed)."""
    document = read_results(folder)
    settings = document["settings"]
    base = from_dict(settings["config_values"])
    entries = [Entry(**e) for e in settings["cells"]]
    known = {e.cell for e in entries}
    runs = [RunResult.from_dict(r) for r in document["runs"]]
    strangers = sorted({r.cell for r in runs} - known)
    if strangers:
        raise CharlmError(f"{folder / RESULTS} has runs of {', '.join(strangers)}, which its settings do not list")
    for run in runs:
        if run.vocab_size is None:
            run.vocab_size = vocab_size_of(run, base)
    hidden = {cell: int(size) for cell, size in settings["hidden_sizes"].items()}
    summaries = summarize(entries, settings["seeds"], hidden, runs)
    png, note = plot_runs(folder, runs, entries)
    curves = png.name if png else document.get("curves")
    files = write_results(folder, base, summaries, runs, settings, show_hidden=bool(settings.get("match_params")),
                          curves=curves, complete=bool(document.get("complete", True)))
    if png is not None:
        files.append(png)
    if console is not None:
        print_table(console, lambda width: render_table(summaries, show_hidden=bool(settings.get("match_params")),
                                                        title=f"charlm compare: {escape(str(folder))}", width=width))
        against = significance_table(summaries, settings.get("preset"))
        if against is not None:
            console.print(against)
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}")
    return summaries, files
