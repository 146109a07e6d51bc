"""Each cell's runs of a comparison (one per seed) and their mean, standard deviation, minimum and maximum.

Diverged runs are reported, not averaged: a run whose best validation loss is not finite or worse than a uniform
guess (ln V nats, :meth:`RunResult.diverged`) is counted in the cell's ``diverged`` figure and left out of every
mean, spread and range (and of the t-test, :mod:`~charlm.tools.compare.significance`). A cell all of whose runs
diverged has no figures, only its count.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from charlm.tools.compare.plan import Entry
from charlm.tools.compare.records import RunResult

SUMMARY_METRICS = ("val_loss", "val_bpc", "val_ppl", "test_loss", "test_bpc", "test_ppl", "train_seconds",
                   "train_chars_per_s", "best_step", "steps", "parameters")


@dataclass
class CellSummary:
    """The runs of one cell (one per seed) and their mean / spread over the runs that did not diverge.

    ``vocab_size`` is V for runs whose record does not say (records made before charlm kept it)."""

    entry: Entry
    hidden_size: int
    seeds: list[int]
    runs: list[RunResult] = field(default_factory=list)
    vocab_size: int | None = None

    @property
    def diverged(self) -> list[RunResult]:
        """The runs that diverged (:meth:`RunResult.diverged`)."""
        return [r for r in self.runs if r.diverged(self.vocab_size)]

    @property
    def kept(self) -> list[RunResult]:
        """The runs the figures are made of: those that did not diverge."""
        return [r for r in self.runs if not r.diverged(self.vocab_size)]

    def diverged_text(self) -> str:
        """``1/3``: diverged runs of the runs done."""
        return f"{len(self.diverged)}/{len(self.runs)}"

    def stat(self, metric: str) -> dict[str, float | None]:
        values = [float(getattr(r, metric)) for r in self.kept]
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
                               "seeds": " ".join(str(r.seed) for r in self.runs), "runs": len(self.runs),
                               "diverged": len(self.diverged)}
        for metric in SUMMARY_METRICS:
            s = self.stat(metric)
            row[metric] = s["mean"]
            if metric in ("val_loss", "val_bpc", "test_loss", "test_bpc"):
                row[f"{metric}_std"], row[f"{metric}_min"], row[f"{metric}_max"] = s["std"], s["min"], s["max"]
        row["best"] = best
        return row


def summarize(entries: Sequence[Entry], seeds: Sequence[int], hidden: dict[str, int],
              results: Sequence[RunResult], vocab_size: int | None = None) -> list[CellSummary]:
    """The runs grouped by cell, in the order of ``entries``; ``vocab_size``: V for records that lack it."""
    summaries = {e.cell: CellSummary(e, hidden[e.cell], list(seeds), vocab_size=vocab_size) for e in entries}
    for result in results:
        summaries[result.cell].runs.append(result)
    return list(summaries.values())


def best_cell(summaries: Sequence[CellSummary]) -> str | None:
    """The cell with the lowest mean validation bpc (validation chooses; test is only reported) among those none
    of whose runs diverged; where every cell has a diverged run, among those with the smallest share of them."""
    done = [s for s in summaries if s.kept]
    if not done:
        return None
    return min(done, key=lambda s: (len(s.diverged) / len(s.runs), s.mean("val_bpc"))).entry.cell
