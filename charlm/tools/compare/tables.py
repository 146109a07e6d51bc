"""What a comparison reports: the table (in the terminal with Rich, in ``results.md`` as markdown) of each
cell's mean and spread over seeds (:mod:`~charlm.tools.compare.summary`), and the results files.

Files written to the comparison folder (atomically, so an interruption never leaves half a file):
``results.csv`` (one row per cell: means, with std / min / max of the scores), ``runs.csv`` (one row per
run), ``results.json`` (both plus the settings and each run's validation curve) and ``results.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from charlm import __version__
from charlm.config import Config
from charlm.tools.compare.records import RunResult
from charlm.tools.compare.significance import significance_markdown, significance_rows
from charlm.tools.compare.summary import CellSummary, best_cell
from charlm.util.atomic import atomic_write_text


# ------------------------------------------------------------------------------------------- table
def format_seconds(seconds: float) -> str:
    """``42.0s``, ``3m05s``, ``1h02m``: short enough for a table column."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _num(s: dict[str, float | None], digits: int) -> str:
    if s["mean"] is None:
        return "—"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def _range(s: dict[str, float | None], digits: int) -> str:
    if s["min"] is None:
        return "—"
    return f"{s['min']:.{digits}f}–{s['max']:.{digits}f}"


def table_cells(summary: CellSummary, *, multi_seed: bool, show_hidden: bool) -> list[str]:
    """The displayed values of one row (shared by the terminal table and results.md): figures over the runs that
    did not diverge ("—" where none is left), then, with several seeds, the runs done and the diverged ones."""
    name = summary.entry.name if summary.entry.name == summary.entry.cell else (
        f"{summary.entry.name} ({summary.entry.cell})")
    params = summary.stat("parameters")
    cells = [name]
    if show_hidden:
        cells.append(str(summary.hidden_size))
    best_steps = summary.stat("best_step")
    cells += [
        "—" if params["mean"] is None else f"{round(params['mean']):,}",
        _num(summary.stat("val_loss"), 4), _num(summary.stat("val_bpc"), 4),
    ]
    if multi_seed:
        cells.append(_range(summary.stat("val_bpc"), 4))
    cells += [
        _num(summary.stat("test_bpc"), 4), _num(summary.stat("test_ppl"), 3),
        "—" if not summary.kept else format_seconds(summary.mean("train_seconds")),
        "—" if not summary.kept else f"{summary.mean('train_chars_per_s'):,.0f}",
        "—" if best_steps["min"] is None else (
            f"{best_steps['min']:.0f}" if best_steps["min"] == best_steps["max"]
            else f"{best_steps['min']:.0f}–{best_steps['max']:.0f}"),
    ]
    if multi_seed:
        cells += [f"{len(summary.runs)}/{len(summary.seeds)}", summary.diverged_text() if summary.runs else "—"]
    elif summary.diverged:
        cells[0] += " (diverged)"
    return cells


def table_headers(*, multi_seed: bool, show_hidden: bool, short: bool = False) -> list[str]:
    """Column names; ``short`` ones for the terminal, where width is scarce."""
    heads = ["cell"] + (["hidden"] if show_hidden else [])
    heads += ["params" if short else "parameters", "val loss", "val bpc"]
    heads += [("val bpc range" if short else "val bpc min–max")] if multi_seed else []
    heads += ["test bpc", "test ppl"]
    heads += ["time", "chars/s", "best step"] if short else ["training time", "train chars/s", "best step"]
    return heads + (["seeds" if short else "seeds done", "diverged"] if multi_seed else [])


_DROP_FOR_WIDTH = ("val loss", "test ppl", "val bpc range", "best step", "chars/s", "params", "hidden", "seeds")


def render_table(summaries: Sequence[CellSummary], *, show_hidden: bool = False, running: str | None = None,
                 title: str | None = None, width: int | None = None) -> Table:
    """The comparison as a rich table; the best row (lowest mean val bpc) is bold green with a star.

    Values never wrap or shrink; when the table is wider than ``width``, the least important columns
    are left out (in the order of ``_DROP_FOR_WIDTH``) and the caption says so.
    """
    from rich.measure import Measurement

    multi_seed = any(len(s.seeds) > 1 for s in summaries)
    best = best_cell(summaries)
    heads = table_headers(multi_seed=multi_seed, show_hidden=show_hidden, short=True)
    rows = [table_cells(s, multi_seed=multi_seed, show_hidden=show_hidden) for s in summaries]
    marks: list[tuple[str, str | None]] = []
    for s in summaries:
        if s.entry.cell == best:
            marks.append(("★", "bold green"))
        elif s.entry.cell == running:
            marks.append(("▶", "yellow"))
        else:
            marks.append(("·", "dim") if not s.runs else ("", None))
    dropped: list[str] = []

    def build() -> Table:
        caption = "loss in nats/char; bpc = bits/char; ppl = test perplexity; time = training wall time"
        caption += ("; mean ± std over seeds that did not diverge (best val loss finite and below ln V)"
                    if multi_seed else "")
        caption += f"; left out for width: {', '.join(dropped)} (see results.md)" if dropped else ""
        table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, caption=caption)
        keep = [i for i, h in enumerate(heads) if h not in dropped]
        table.add_column("", no_wrap=True)
        for i in keep:
            longest = max([len(r[i]) for r in rows] + [len(word) for word in heads[i].split()])
            table.add_column(heads[i], justify="left" if i == 0 else "right", min_width=longest)
        for (mark, style), row in zip(marks, rows, strict=True):
            table.add_row(mark, *(row[i] for i in keep), style=style)
        return table

    table = build()
    if width is not None:
        probe = Console(width=10_000)
        for head in _DROP_FOR_WIDTH:
            if Measurement.get(probe, probe.options, table).maximum <= width:  # headers unwrapped: safe side
                break
            if head in heads:
                dropped.append(head)
                table = build()
    return table


def print_table(console: Console, table_for: Callable[[int], Table]) -> None:
    """Print at the terminal's width; to a pipe or log file at 160 columns rather than a squeezed 80."""
    if console.is_terminal:
        console.print(table_for(console.width))
    else:
        wide = max(console.width, 160)
        Console(file=console.file, width=wide, highlight=False).print(table_for(wide))


def markdown_table(summaries: Sequence[CellSummary], *, show_hidden: bool = False) -> str:
    multi_seed = any(len(s.seeds) > 1 for s in summaries)
    best = best_cell(summaries)
    heads = table_headers(multi_seed=multi_seed, show_hidden=show_hidden)
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] + ["---:"] * (len(heads) - 1)) + "|"]
    for s in summaries:
        cells = table_cells(s, multi_seed=multi_seed, show_hidden=show_hidden)
        if s.entry.cell == best:
            cells = [f"**{c}**" for c in cells]
            cells[0] = f"★ {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- files
def _csv_value(value: Any) -> Any:
    """Blank for a missing value (a std of one seed), whole numbers without ``.0``, 6 decimals otherwise."""
    if value is None:
        return ""
    if isinstance(value, float):
        return int(value) if value.is_integer() else round(value, 6)
    return value


def _csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return buffer.getvalue()


RESULT_COLUMNS = ["cell", "name", "hidden_size", "parameters", "seeds", "runs", "diverged",
                  "val_loss", "val_loss_std", "val_loss_min", "val_loss_max",
                  "val_bpc", "val_bpc_std", "val_bpc_min", "val_bpc_max", "val_ppl",
                  "test_loss", "test_loss_std", "test_loss_min", "test_loss_max",
                  "test_bpc", "test_bpc_std", "test_bpc_min", "test_bpc_max", "test_ppl",
                  "train_seconds", "train_chars_per_s", "best_step", "steps", "best"]
RUN_COLUMNS = [f.name for f in dataclasses.fields(RunResult) if f.name != "curve"] + ["diverged"]


def run_rows(summaries: Sequence[CellSummary], runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """``runs.csv``'s rows: every run's scores and whether it diverged; a diverged run's perplexities left blank
    (exp of a loss past ln V is no figure of the model's, and may run to 40 digits)."""
    vocab = {s.entry.cell: s.vocab_size for s in summaries}
    rows = []
    for run in runs:
        diverged = run.diverged(vocab.get(run.cell))
        row = {**run.row(), "diverged": diverged}
        if diverged:
            row["val_ppl"] = row["test_ppl"] = None
        rows.append(row)
    return rows


def budget_text(config: Config) -> str:
    """``300 steps per run``, ``2m00s per run``, or both, ``whichever comes first``."""
    t = config.train
    parts = []
    if t.max_steps > 0:
        parts.append(f"{t.max_steps:,} steps")
    if t.max_time is not None:
        parts.append(format_seconds(t.max_time))
    if t.max_epochs > 0:
        parts.append(f"{t.max_epochs} epochs")
    return " or ".join(parts) + " per run, whichever comes first" if len(parts) > 1 else "".join(parts) + " per run"


def corpus_text(corpus: object) -> str:
    """results.md's corpus line: ``tinyshakespeare.txt (1,115,394 characters, sha256 86c4e6aa9db7…)`` from the
    record (:meth:`charlm.data.corpus.Corpus.record`); an older results.json's plain string as it is."""
    if isinstance(corpus, dict):
        return f"{corpus.get('file')} ({corpus.get('chars', 0):,} characters, sha256 {str(corpus.get('sha256'))[:12]}…)"
    return str(corpus)


def write_results(out: Path, base: Config, summaries: Sequence[CellSummary], runs: Sequence[RunResult],
                  settings: dict[str, Any], *, show_hidden: bool, curves: str | None, complete: bool) -> list[Path]:
    """results.csv (per cell), runs.csv (per run), results.json (everything), results.md (the table)."""
    best = best_cell(summaries)
    rows = [s.row(s.entry.cell == best) for s in summaries if s.runs]
    files = {name: out / name for name in ("results.csv", "runs.csv", "results.json", "results.md")}
    atomic_write_text(files["results.csv"], _csv_text(rows, RESULT_COLUMNS))
    atomic_write_text(files["runs.csv"], _csv_text(run_rows(summaries, runs), RUN_COLUMNS))
    document = {"charlm_version": __version__, "written": dt.datetime.now().isoformat(timespec="seconds"),
                "complete": complete, "settings": settings, "best": best, "curves": curves,
                "cells": rows, "runs": [dataclasses.asdict(r) for r in runs],
                "against_reference": significance_rows(summaries, settings.get("preset"))}
    atomic_write_text(files["results.json"], json.dumps(document, indent=1) + "\n")
    seeds = settings.get("seeds", [])
    m = base.model
    lines = ["# charlm compare", "",
             f"- cells: {', '.join(s.entry.name for s in summaries)}",
             f"- config: `{settings.get('config')}`" + (
                 f" with {', '.join(f'`{o}`' for o in settings.get('overrides', []))}"
                 if settings.get("overrides") else ""),
             f"- model: {m.num_layers} layers, hidden {m.hidden_size}"
             + (" (matched parameter counts, see the hidden column)" if show_hidden else "")
             + f", embedding {m.embedding_size}; batch {base.data.batch_size} x {base.data.bptt} chars",
             f"- budget: {budget_text(base)}; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
             f"- corpus: {corpus_text(settings.get('corpus'))}", "",
             markdown_table(summaries, show_hidden=show_hidden), "",
             "Scores come from each run's best checkpoint (lowest validation loss), evaluated on the whole "
             "validation and test splits. ★ marks the lowest validation bpc among the cells with no diverged "
             "run: validation chooses, test is only reported. Perplexity is on the test split."
             + (" Values are mean ± sample std over seeds; min–max gives the range." if len(seeds) > 1 else "")
             + " A run whose best validation loss is not finite or above ln V (a uniform guess over the V "
             "characters) diverged: it is counted in the diverged column and left out of every figure and test."]
    against = significance_markdown(summaries, settings.get("preset"))
    lines += ["", *against] if against else []
    if not complete:
        lines += ["", "_Incomplete: some runs have not finished; re-run the same command to resume._"]
    if curves:
        lines += ["", f"![validation bits per character against step and wall time]({curves})"]
    atomic_write_text(files["results.md"], "\n".join(lines) + "\n")
    return list(files.values())
