"""Each cell's runs of a comparison (one per seed) and their mean, standard deviation, minimum and maximum."""

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
