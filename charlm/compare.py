"""``charlm compare``: several cells trained under one config, seed and budget; one table, one figure.

Every cell (and, with ``--seeds``, every seed) is one ordinary training run in its own folder
``<out>/<cell>-seed<seed>/`` (``best.ckpt``, ``last.ckpt``, ``metrics.csv``, ``config.yaml``), made by
:func:`charlm.train.train`. Only ``model.cell``, ``train.seed`` and, with ``--match-params``,
``model.hidden_size`` differ between runs. Each finished run is scored again from its ``best.ckpt`` on
the whole validation and test splits, and the figures land in ``<out>/``:

- ``results.csv``: one row per cell (mean over seeds, with std / min / max columns), ``runs.csv``: one
  row per run, ``results.json``: both plus the settings and each run's validation curve,
  ``results.md``: the table for a README, ``curves.png``: validation bpc against step and wall time.

Resuming: ``<out>/<run>/compare-run.json`` records the run's settings, its training segments and,
once it is finished, its scores. Re-running the same command with the same ``--out`` skips every run
that has scores, resumes an unfinished one from its ``last.ckpt``, and refuses (naming the keys) a
run whose settings differ. Before a resume the earlier segment's ``metrics.csv`` is set aside as
``metrics.seg<k>.csv``, and the curves are stitched at the resume step (so validation points logged
after the last checkpoint of an interrupted segment are dropped, not doubled).

Matched parameters (``--match-params``): the first cell is the reference at the configured
``model.hidden_size``; every other cell gets the hidden size whose total parameter count (embedding,
recurrent layers, decoder) is nearest the reference's, ties going to the smaller size. The count
grows with the hidden size, so a binary search over sizes finds it, counting on PyTorch's ``meta``
device (no memory is allocated). The embedding size and the number of layers stay as configured;
with tied weights the last layer is as wide as the embedding, so only the inner layers change (with
one tied layer nothing can change, and compare says so).

Presets: ``--preset jozefowicz`` / ``greff`` name their rows as the papers do (``LSTM-f``, ``MUT1``, ``V``,
``NIG`` ...). The jozefowicz preset also sets ``model.forget_bias=0`` (over the config file, before any
``--set``): the paper's LSTM rows start from a zero forget bias and LSTM-b is the one with a bias of 1.

Budget: ``--max-steps`` alone turns the config's time limit off and ``--max-time`` alone its step
limit, so every cell gets exactly the stated budget; with both, whichever comes first. Samples printed
during training are off (``--set sample.enabled=true`` turns them back on).

Wall time: each validation point is placed at the training time the run logged with it (``elapsed_s``
in ``metrics.csv``, carried over a resume by the checkpoint), and a final best point at the time its
``best.ckpt`` was written. A point without a logged time (a run resumed from a checkpoint made before
charlm kept the time) is left out of the wall-time panel, never placed by guess.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime as dt
import io
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm.config import Config, ModelConfig, cell_registry_names, check_seed, validate
from charlm.errors import CharlmError, TrainingInterrupted
from charlm.train import train as run_training

LN2 = math.log(2.0)
RUN_RECORD = "compare-run.json"
RECORD_VERSION = 2  # 2: curve times as logged (version 1 placed them in proportion to steps)

# The rows of the papers' tables, in their order: cell name -> the name the paper gives it.
PRESETS: dict[str, dict[str, str]] = {
    "jozefowicz": {"rnn": "Tanh", "lstm": "LSTM", "lstm-f": "LSTM-f", "lstm-i": "LSTM-i", "lstm-o": "LSTM-o",
                   "lstm-b": "LSTM-b", "gru": "GRU", "mut1": "MUT1", "mut2": "MUT2", "mut3": "MUT3"},
    "greff": {"peephole": "V", "nig": "NIG", "nfg": "NFG", "nog": "NOG", "niaf": "NIAF", "noaf": "NOAF",
              "np": "NP", "cifg": "CIFG", "fgr": "FGR"},
}
PRESET_SOURCES = {
    "jozefowicz": "Jozefowicz, Zaremba & Sutskever 2015: Tanh, LSTM and its ablations, GRU, MUT1-3",
    "greff": "Greff et al. 2017, 'LSTM: A Search Space Odyssey': vanilla (peephole) LSTM and its 8 variants",
}
# Config overrides a preset applies before the user's --set. Jozefowicz et al. start every LSTM-family
# cell with a zero forget-gate bias and make the bias of 1 its own row (LSTM-b, which forces 1.0): the
# preset pins 0 whatever the config file says, so its LSTM and LSTM-b rows stay two models.
PRESET_OVERRIDES: dict[str, list[str]] = {"jozefowicz": ["model.forget_bias=0.0"], "greff": []}
# The settings a run must share with its record to be skipped or resumed (the rest is display / device).
_CHECKED_TRAIN_KEYS = ("seed", "max_epochs", "max_steps", "max_time", "val_every_steps")


# --------------------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Entry:
    """One cell of the comparison and the name the table shows for it."""

    cell: str
    name: str


def resolve_entries(cells: str | None, preset: str | None) -> list[Entry]:
    """The cells of ``--cells a,b,c`` (names as ``charlm cells`` lists them, any case) or of ``--preset``."""
    presets = "; ".join(f"{key} ({PRESET_SOURCES[key]})" for key in PRESETS)
    if cells is not None and preset is not None:
        raise CharlmError("give --cells or --preset, not both")
    if preset is not None:
        key = preset.strip().lower()
        if key not in PRESETS:
            raise CharlmError(f"unknown preset '{preset}'; presets: {presets}")
        return [Entry(cell, name) for cell, name in PRESETS[key].items()]
    if cells is None:
        raise CharlmError(f"say which cells to compare: --cells lstm,gru,peephole or --preset NAME; "
                          f"presets: {presets}")
    given = [c.strip() for c in cells.split(",") if c.strip()]
    if not given:
        raise CharlmError("--cells is empty; give comma-separated cell names, e.g. --cells lstm,gru")
    names = list(dict.fromkeys(cell_registry_names(given, where=" in --cells")))  # as `train --cell` spells them
    return [Entry(n, n) for n in names]


def parse_seeds(text: str | None, default: int) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (duplicates dropped); ``None`` -> the config's seed."""
    if text is None:
        return [default]
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CharlmError(f"--seeds expects comma-separated integers, e.g. 1,2,3; got '{text}'") from None
    if not seeds:
        raise CharlmError(f"--seeds expects comma-separated integers, e.g. 1,2,3; got '{text}'")
    for seed in seeds:
        check_seed(seed, "each of --seeds")
    return list(dict.fromkeys(seeds))


def budget_overrides(max_steps: int | None, max_time: float | None) -> list[str]:
    """``--max-steps`` / ``--max-time`` as config overrides; one alone turns the other rule off.

    Every cell must get the same budget: with only a step budget a slow cell must not be cut short
    by the config's time limit, and with only a time budget a fast one must not stop at a step count.
    """
    if max_steps is not None and max_steps < 1:
        raise CharlmError(f"--max-steps must be at least 1, got {max_steps}")
    if max_time is not None and max_time <= 0:
        raise CharlmError(f"--max-time must be positive seconds, got {max_time}")
    out: list[str] = []
    if max_steps is not None:
        out.append(f"train.max_steps={max_steps}")
        if max_time is None:
            out += ["train.max_time=null", "train.max_epochs=-1"]
    if max_time is not None:
        out.append(f"train.max_time={max_time}")
        if max_steps is None:
            out += ["train.max_steps=-1", "train.max_epochs=-1"]
    return out


# ------------------------------------------------------------------------------- matched parameters
def parameter_count(model: ModelConfig, vocab_size: int) -> int:
    """Parameters of the language model ``model`` describes, built on the meta device (no memory)."""
    import torch

    from charlm.model import CharLM, count_parameters

    try:
        with torch.device("meta"):
            return count_parameters(CharLM(vocab_size, model))
    except (RuntimeError, NotImplementedError, TypeError):  # an initialiser without meta support
        return count_parameters(CharLM(vocab_size, model))


def match_hidden_size(model: ModelConfig, vocab_size: int, target: int,
                      count: Callable[[ModelConfig, int], int] = parameter_count) -> int | None:
    """The hidden size whose parameter count is nearest ``target`` (ties: the smaller size).

    ``None`` when the hidden size does not change the count (one layer with tied weights).
    """
    cache: dict[int, int] = {}

    def params(h: int) -> int:
        if h not in cache:
            cache[h] = count(dataclasses.replace(model, hidden_size=h), vocab_size)
        return cache[h]

    hi = max(2, model.hidden_size)
    if params(1) == params(hi):
        return None
    while params(hi) < target:
        if hi >= 1 << 16:
            raise CharlmError(f"--match-params: cell '{model.cell}' cannot reach {target:,} parameters "
                              f"below hidden size {hi:,}")
        hi *= 2
    lo = 1
    while lo < hi:  # smallest size with at least the target count
        mid = (lo + hi) // 2
        if params(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and abs(params(lo - 1) - target) <= abs(params(lo) - target):
        return lo - 1
    return lo


def matched_hidden_sizes(base: Config, entries: Sequence[Entry], vocab_size: int,
                         console: Console | None = None) -> dict[str, int]:
    """``{cell: hidden_size}``: the first cell keeps the configured size, the others match its count."""
    reference = dataclasses.replace(base.model, cell=entries[0].cell)
    target = parameter_count(reference, vocab_size)
    sizes = {entries[0].cell: base.model.hidden_size}
    for entry in entries[1:]:
        size = match_hidden_size(dataclasses.replace(base.model, cell=entry.cell), vocab_size, target)
        if size is None:
            if console is not None:
                console.print(f"[yellow]note:[/] the hidden size does not change {entry.cell}'s parameter count "
                              f"(one layer with tied weights); it keeps hidden size {base.model.hidden_size}")
            size = base.model.hidden_size
        sizes[entry.cell] = size
    if console is not None:
        listed = ", ".join(f"{e.name} {sizes[e.cell]}" for e in entries)
        console.print(f"[bold]matched parameters[/] to {entries[0].name} ({target:,}): hidden sizes {listed}")
    return sizes


# ------------------------------------------------------------------------------------------ results
@dataclass
class RunResult:
    """One finished run, scored from its best checkpoint on the whole val and test splits."""

    cell: str
    name: str
    seed: int
    run_dir: str  # relative to the comparison folder
    hidden_size: int
    parameters: int
    val_loss: float
    val_bpc: float
    val_ppl: float
    test_loss: float
    test_bpc: float
    test_ppl: float
    train_seconds: float  # wall time of trainer.fit, summed over resumed segments
    train_chars_per_s: float  # median of the logged per-step throughput
    best_step: int  # optimizer steps behind best.ckpt
    steps: int  # optimizer steps trained
    # step, seconds (training time logged at that validation, None where unknown), val_loss, val_bpc
    curve: list[dict[str, float | None]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "curve"}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


SUMMARY_METRICS = ("val_loss", "val_bpc", "val_ppl", "test_loss", "test_bpc", "test_ppl", "train_seconds",
                   "train_chars_per_s", "best_step", "steps", "parameters")


@dataclass
class CellSummary:
    """The runs of one cell (one per seed) and their mean / spread."""

    entry: Entry
    hidden_size: int
    seeds: list[int]
    runs: list[RunResult] = field(default_factory=list)

    def stat(self, metric: str) -> dict[str, float | None]:
        values = [float(getattr(r, metric)) for r in self.runs]
        if not values:
            return {"mean": None, "std": None, "min": None, "max": None}
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
                "min": min(values), "max": max(values)}

    def mean(self, metric: str) -> float:
        value = self.stat(metric)["mean"]
        return math.inf if value is None else value

    def row(self, best: bool) -> dict[str, Any]:
        """The flat ``results.csv`` row: means, plus std / min / max of the scores."""
        row: dict[str, Any] = {"cell": self.entry.cell, "name": self.entry.name, "hidden_size": self.hidden_size,
                               "seeds": " ".join(str(r.seed) for r in self.runs), "runs": len(self.runs)}
        for metric in SUMMARY_METRICS:
            s = self.stat(metric)
            row[metric] = s["mean"]
            if metric in ("val_loss", "val_bpc", "test_loss", "test_bpc"):
                row[f"{metric}_std"], row[f"{metric}_min"], row[f"{metric}_max"] = s["std"], s["min"], s["max"]
        row["best"] = best
        return row


def summarize(entries: Sequence[Entry], seeds: Sequence[int], hidden: dict[str, int],
              results: Sequence[RunResult]) -> list[CellSummary]:
    summaries = {e.cell: CellSummary(e, hidden[e.cell], list(seeds)) for e in entries}
    for result in results:
        summaries[result.cell].runs.append(result)
    return list(summaries.values())


def best_cell(summaries: Sequence[CellSummary]) -> str | None:
    """The cell with the lowest mean validation bpc (validation chooses; test is only reported)."""
    done = [s for s in summaries if s.runs]
    return min(done, key=lambda s: s.mean("val_bpc")).entry.cell if done else None


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
    """The displayed values of one row (shared by the terminal table and results.md)."""
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
        "—" if not summary.runs else format_seconds(summary.mean("train_seconds")),
        "—" if not summary.runs else f"{summary.mean('train_chars_per_s'):,.0f}",
        "—" if best_steps["min"] is None else (
            f"{best_steps['min']:.0f}" if best_steps["min"] == best_steps["max"]
            else f"{best_steps['min']:.0f}–{best_steps['max']:.0f}"),
    ]
    if multi_seed:
        cells.append(f"{len(summary.runs)}/{len(summary.seeds)}")
    return cells


def table_headers(*, multi_seed: bool, show_hidden: bool, short: bool = False) -> list[str]:
    """Column names; ``short`` ones for the terminal, where width is scarce."""
    heads = ["cell"] + (["hidden"] if show_hidden else [])
    heads += ["params" if short else "parameters", "val loss", "val bpc"]
    heads += [("val bpc range" if short else "val bpc min–max")] if multi_seed else []
    heads += ["test bpc", "test ppl"]
    heads += ["time", "chars/s", "best step"] if short else ["training time", "train chars/s", "best step"]
    return heads + (["seeds" if short else "seeds done"] if multi_seed else [])


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
        caption += "; mean ± std over seeds" if multi_seed else ""
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


# ----------------------------------------------------------------------------------------- files
def readable_mode() -> int:
    """The mode a plain ``open()`` would give a new file (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted write never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


RESULT_COLUMNS = ["cell", "name", "hidden_size", "parameters", "seeds", "runs",
                  "val_loss", "val_loss_std", "val_loss_min", "val_loss_max",
                  "val_bpc", "val_bpc_std", "val_bpc_min", "val_bpc_max", "val_ppl",
                  "test_loss", "test_loss_std", "test_loss_min", "test_loss_max",
                  "test_bpc", "test_bpc_std", "test_bpc_min", "test_bpc_max", "test_ppl",
                  "train_seconds", "train_chars_per_s", "best_step", "steps", "best"]
RUN_COLUMNS = [f.name for f in dataclasses.fields(RunResult) if f.name != "curve"]


# ------------------------------------------------------------------------------------------ a run
@dataclass(frozen=True)
class PlannedRun:
    entry: Entry
    seed: int
    config: Config
    run_dir: Path


def fingerprint(config: Config) -> dict[str, Any]:
    """The settings that make two runs the same experiment."""
    d = config.to_dict()
    return {"data": d["data"], "model": d["model"], "optim": d["optim"],
            "train": {k: d["train"][k] for k in _CHECKED_TRAIN_KEYS}}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CharlmError(f"cannot read {path} ({exc}); delete that run's folder to retrain it") from None
    if not isinstance(values, dict):
        raise CharlmError(f"{path} is not a charlm compare record; delete that run's folder to retrain it")
    return values


def _checkpoint_step(path: Path) -> int:
    from charlm.checkpoint import safe_load

    return int(safe_load(path).get("global_step", 0))


CurvePoint = tuple[int, float, float, float | None]  # step, val_loss, val_bpc, elapsed_s (None: not logged)


def read_curve(run_dir: Path, segments: Sequence[dict[str, Any]]) -> tuple[list[CurvePoint], list[float]]:
    """Validation points ``(step, val_loss, val_bpc, elapsed_s)`` and logged throughputs, stitched over
    segments.

    Lightning's CSV ``step`` is zero-based at logging time; ``step + 1`` is the number of optimizer
    steps done, which is also what a checkpoint's ``global_step`` counts. ``elapsed_s`` is the training
    time the run logged at that validation (continued over resumes), ``None`` where it logged none.
    """
    val: dict[int, tuple[float, float, float | None]] = {}
    speeds: list[float] = []
    for i, segment in enumerate(segments):
        name = segment.get("metrics") or ("metrics.csv" if i == len(segments) - 1 else None)
        path = run_dir / name if name else None
        if path is None or not path.is_file():
            continue
        nxt = segments[i + 1] if i + 1 < len(segments) else None
        cutoff = None if nxt is None else (nxt.get("resume_step") or 0)
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    step = int(float(row["step"])) + 1
                except (KeyError, ValueError):
                    continue
                if cutoff is not None and step > cutoff:
                    continue
                if row.get("val_loss"):
                    loss = float(row["val_loss"])
                    val[step] = (loss, float(row["val_bpc"]) if row.get("val_bpc") else loss / LN2,
                                 float(row["elapsed_s"]) if row.get("elapsed_s") else None)
                if row.get("train_chars_per_s"):
                    speeds.append(float(row["train_chars_per_s"]))
    return [(s, *val[s]) for s in sorted(val)], speeds


class _Scorer:
    """Scores best checkpoints on the val and test splits of the corpus (encoded once per vocabulary)."""

    def __init__(self, corpus_text: str) -> None:
        self.text = corpus_text
        self._splits: dict[tuple[str, float, float], Any] = {}

    def __call__(self, checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], int]:
        """Validation and test scores, the checkpoint itself and the model's parameter count."""
        from charlm.checkpoint import load_model
        from charlm.datamodule import split_ids
        from charlm.evaluate import evaluate_ids
        from charlm.model import count_parameters

        model, vocab, cfg, ckpt = load_model(checkpoint)
        key = (vocab.chars, cfg.data.val_fraction, cfg.data.test_fraction)
        if key not in self._splits:
            self._splits[key] = split_ids(vocab.encode(self.text, what="corpus"), key[1], key[2])
        splits = self._splits[key]
        kwargs = {"batch_size": cfg.data.eval_batch_size, "bptt": cfg.data.bptt}
        val = evaluate_ids(model, splits.val, **kwargs)
        test = evaluate_ids(model, splits.test, **kwargs)
        return val, test, ckpt, count_parameters(model)


def train_run(plan: PlannedRun, out: Path, scorer: _Scorer, console: Console | None) -> RunResult:
    """Train (or resume) one run and score it; the record is saved before and after training."""
    run_dir, record_path = plan.run_dir, plan.run_dir / RUN_RECORD
    record = _read_json(record_path) if record_path.is_file() else {
        "version": RECORD_VERSION, "cell": plan.entry.cell, "name": plan.entry.name, "seed": plan.seed,
        "fingerprint": fingerprint(plan.config), "segments": [], "result": None}
    segments: list[dict[str, Any]] = record["segments"]
    last = run_dir / "last.ckpt"
    resume = last if last.is_file() else None
    if segments and segments[-1].get("seconds") is None:  # the previous attempt was interrupted
        started = float(segments[-1]["started"])
        segments[-1]["seconds"] = max(0.0, last.stat().st_mtime - started) if resume else 0.0
        segments[-1]["interrupted"] = True
    resume_step = None
    if resume is not None:
        resume_step = _checkpoint_step(resume)
        if segments and (run_dir / "metrics.csv").is_file():
            kept = f"metrics.seg{len(segments)}.csv"
            (run_dir / "metrics.csv").replace(run_dir / kept)
            segments[-1]["metrics"] = kept
    segments.append({"started": time.time(), "resume_step": resume_step, "seconds": None})
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record_path, json.dumps(record, indent=1))

    trained = run_training(plan.config, resume=resume, run_dir=run_dir, console=console)
    segments[-1]["seconds"] = trained.seconds
    atomic_write_text(record_path, json.dumps(record, indent=1))

    val, test, best_ckpt, parameters = scorer(trained.best_checkpoint)
    best_step = int(best_ckpt.get("global_step", 0))
    seconds = sum(float(s["seconds"] or 0.0) for s in segments)
    steps = trained.steps
    points, speeds = read_curve(run_dir, segments)
    d = plan.config.data
    chars_per_s = statistics.median(speeds) if speeds else steps * d.batch_size * d.bptt / max(seconds, 1e-9)
    curve: list[dict[str, float | None]] = [
        {"step": s, "seconds": elapsed, "val_loss": loss, "val_bpc": bpc} for s, loss, bpc, elapsed in points]
    if best_step not in {p[0] for p in points}:  # the final weights were best (scored after the budget ran out)
        curve.append({"step": best_step, "seconds": best_ckpt.get("elapsed_s"), "val_loss": val["loss"],
                      "val_bpc": val["bpc"]})
        curve.sort(key=lambda p: p["step"])
    result = RunResult(
        cell=plan.entry.cell, name=plan.entry.name, seed=plan.seed, run_dir=str(run_dir.relative_to(out)),
        hidden_size=plan.config.model.hidden_size, parameters=parameters,
        val_loss=val["loss"], val_bpc=val["bpc"], val_ppl=val["perplexity"],
        test_loss=test["loss"], test_bpc=test["bpc"], test_ppl=test["perplexity"],
        train_seconds=seconds, train_chars_per_s=chars_per_s, best_step=best_step, steps=steps, curve=curve)
    record["result"], record["version"] = dataclasses.asdict(result), RECORD_VERSION
    atomic_write_text(record_path, json.dumps(record, indent=1))
    return result


def finished_result(plan: PlannedRun) -> RunResult | None:
    """The recorded scores of a finished run, ``None`` if it still has to (re)train.

    A folder not made by compare, or one made with other settings, is refused with the differences.
    """
    record_path = plan.run_dir / RUN_RECORD
    if not record_path.is_file():
        if plan.run_dir.is_dir() and any(plan.run_dir.iterdir()):
            raise CharlmError(f"{plan.run_dir} exists but was not made by charlm compare (no {RUN_RECORD}); "
                              "choose another --out")
        return None
    record = _read_json(record_path)
    diff = _differences(record.get("fingerprint", {}), fingerprint(plan.config))
    if diff:
        raise CharlmError(f"{plan.run_dir} was trained with other settings ({'; '.join(diff)}); re-run with the "
                          "same options to resume, or choose another --out")
    if not record.get("result"):
        return None
    result = RunResult.from_dict(record["result"])
    if record.get("version", 1) < 2:  # its curve's times were placed in proportion to steps, not measured
        result.curve = [{**point, "seconds": None} for point in result.curve]
    return result


# ------------------------------------------------------------------------------------ the comparison
@dataclass
class Comparison:
    out: Path
    summaries: list[CellSummary]
    runs: list[RunResult]
    files: list[Path]
    plot_note: str | None  # why curves.png is missing, if it is
    trained: int  # runs trained (or resumed) by this call; the others were already finished


def _budget_text(config: Config) -> str:
    t = config.train
    parts = []
    if t.max_steps > 0:
        parts.append(f"{t.max_steps:,} steps")
    if t.max_time is not None:
        parts.append(format_seconds(t.max_time))
    if t.max_epochs > 0:
        parts.append(f"{t.max_epochs} epochs")
    return " or ".join(parts) + " per run, whichever comes first" if len(parts) > 1 else "".join(parts) + " per run"


def write_results(out: Path, base: Config, summaries: Sequence[CellSummary], runs: Sequence[RunResult],
                  settings: dict[str, Any], *, show_hidden: bool, curves: str | None, complete: bool) -> list[Path]:
    """results.csv (per cell), runs.csv (per run), results.json (everything), results.md (the table)."""
    best = best_cell(summaries)
    rows = [s.row(s.entry.cell == best) for s in summaries if s.runs]
    files = {name: out / name for name in ("results.csv", "runs.csv", "results.json", "results.md")}
    atomic_write_text(files["results.csv"], _csv_text(rows, RESULT_COLUMNS))
    atomic_write_text(files["runs.csv"], _csv_text([r.row() for r in runs], RUN_COLUMNS))
    from charlm import __version__

    document = {"charlm_version": __version__, "written": dt.datetime.now().isoformat(timespec="seconds"),
                "complete": complete, "settings": settings, "best": best, "curves": curves,
                "cells": rows, "runs": [dataclasses.asdict(r) for r in runs]}
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
             f"- budget: {_budget_text(base)}; seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
             f"- corpus: {settings.get('corpus')}", "",
             markdown_table(summaries, show_hidden=show_hidden), "",
             "Scores come from each run's best checkpoint (lowest validation loss), evaluated on the whole "
             "validation and test splits. ★ marks the lowest validation bpc: validation chooses, "
             "test is only reported. Perplexity is on the test split."
             + (" Values are mean ± sample std over seeds; min–max gives the range." if len(seeds) > 1 else "")]
    if not complete:
        lines += ["", "_Incomplete: some runs have not finished; re-run the same command to resume._"]
    if curves:
        lines += ["", f"![validation bits per character against step and wall time]({curves})"]
    atomic_write_text(files["results.md"], "\n".join(lines) + "\n")
    return list(files.values())


def plot(out: Path, runs: Sequence[RunResult], entries: Sequence[Entry]) -> tuple[Path | None, str | None]:
    """curves.png, or ``(None, why not)`` when matplotlib is missing."""
    from charlm.plotting import Curve, PlottingUnavailable, plot_curves

    order = {e.cell: i for i, e in enumerate(entries)}
    multi_seed = len({r.seed for r in runs}) > 1
    curves = []
    for r in sorted(runs, key=lambda r: (order[r.cell], r.seed)):
        count = sum(1 for x in runs if x.cell == r.cell)
        label = f"{r.name} ({count} seeds)" if multi_seed else r.name
        curves.append(Curve(label, [p["step"] for p in r.curve], [p["seconds"] for p in r.curve],
                            [p["val_bpc"] for p in r.curve]))
    try:
        return plot_curves(curves, out / "curves.png", title="validation bits per character"), None
    except PlottingUnavailable as exc:
        return None, f"curves.png not written: {exc}"


def run_comparison(base: Config, entries: Sequence[Entry], *, seeds: Sequence[int], out: Path,
                   match_params: bool = False, console: Console | None = None,
                   settings: dict[str, Any] | None = None) -> Comparison:
    """Train every (cell, seed) not yet finished under ``out``, then write the results and the figure."""
    from charlm.corpus import load_corpus
    from charlm.vocab import Vocab

    if not entries:
        raise CharlmError("no cells to compare")
    validate(base)
    corpus = load_corpus(base.data.path)
    hidden = {e.cell: base.model.hidden_size for e in entries}
    if match_params:
        hidden = matched_hidden_sizes(base, entries, len(Vocab.from_text(corpus.text)), console)
    t = base.train
    if console is not None and t.max_steps > 0 and t.val_every_steps > t.max_steps:
        console.print(f"[yellow]note:[/] validation every {t.val_every_steps} steps never fires within "
                      f"{t.max_steps} steps; the curves will have one point per run "
                      "(lower it with --set train.val_every_steps=N)")
    plans: list[PlannedRun] = []
    for seed in seeds:  # seed-major: a first full row of results comes early
        for entry in entries:
            config = copy.deepcopy(base)
            config.model.cell, config.model.hidden_size, config.train.seed = entry.cell, hidden[entry.cell], seed
            validate(config)
            plans.append(PlannedRun(entry, seed, config, out / f"{entry.cell}-seed{seed}"))
    settings = {**(settings or {}), "cells": [dataclasses.asdict(e) for e in entries], "seeds": list(seeds),
                "match_params": match_params, "hidden_sizes": hidden, "corpus": str(corpus.path),
                "budget": {"max_steps": t.max_steps, "max_time": t.max_time, "max_epochs": t.max_epochs},
                "config_values": base.to_dict()}
    out.mkdir(parents=True, exist_ok=True)

    done: dict[int, RunResult] = {}
    for i, plan in enumerate(plans):
        result = finished_result(plan)
        if result is not None:
            done[i] = result
    scorer = _Scorer(corpus.text)

    def results() -> list[RunResult]:
        return [done[i] for i in sorted(done)]

    def show(running: str | None) -> None:
        if console is not None:
            summaries = summarize(entries, seeds, hidden, results())
            print_table(console, lambda width: render_table(summaries, show_hidden=match_params, running=running,
                                                            title=f"charlm compare: {escape(str(out))}", width=width))

    if console is not None:
        todo = len(plans) - len(done)
        console.print(f"[bold]compare[/] {len(entries)} cells x {len(seeds)} seed(s), {_budget_text(base)}; "
                      f"{len(done)} run(s) already finished, {todo} to train. Results in {escape(str(out))} "
                      f"(re-run with --out {escape(str(out))} to resume).")
    trained = 0
    for i, plan in enumerate(plans):
        if i in done:
            continue
        show(plan.entry.cell)
        if console is not None:
            console.rule(f"[{i + 1}/{len(plans)}] {plan.entry.name} ({plan.entry.cell}), seed {plan.seed}")
        try:
            done[i] = train_run(plan, out, scorer, console)
        except TrainingInterrupted:  # Ctrl-C, last.ckpt saved: say how to resume the comparison, not the run
            raise TrainingInterrupted(
                f"comparison interrupted while training {plan.run_dir.name}; {len(done)} run(s) finished and "
                f"recorded. Run the same command with --out {out} to resume") from None
        except (KeyboardInterrupt, SystemExit):
            if console is not None:
                console.print(f"[yellow]interrupted[/]: finished runs are recorded; run the same command "
                              f"with --out {escape(str(out))} to resume")
            raise
        trained += 1
        write_results(out, base, summarize(entries, seeds, hidden, results()), results(), settings,
                      show_hidden=match_params, curves=None, complete=False)
    show(None)
    runs = results()
    png, note = plot(out, runs, entries)
    summaries = summarize(entries, seeds, hidden, runs)
    files = write_results(out, base, summaries, runs, settings, show_hidden=match_params,
                          curves=png.name if png else None, complete=True)
    if png is not None:
        files.append(png)
    if console is not None and note:
        console.print(f"[yellow]note:[/] {escape(note)}")
    return Comparison(out, summaries, runs, files, note, trained)
