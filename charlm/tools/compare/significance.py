"""Is a row's difference to the reference row real? Welch's t-test over seeds, and the papers' claims.

For each row of a comparison and each split (val, test), the difference of its mean bpc to the reference
row's (the first cell: LSTM in the Jozefowicz preset, V in Greff's), Welch's unequal-variance t-test on
the per-seed values (``scipy.stats.ttest_ind(equal_var=False)``; two-sided), and a mark where p < 0.05.
With fewer than two seeds on either side there is no p-value.

The presets also carry what each paper says of a row (``CLAIMS``); the "we see" column states what this
comparison shows on the test split, and "agree?" says whether the two match:

- ``worse``: the paper found the row significantly worse than the reference; agreed when ours is worse
  with p < 0.05.
- ``same``: no significant difference in the paper; agreed when p >= 0.05.
- ``not worse``: the change cost nothing significant; agreed unless ours is worse with p < 0.05.
- ``not better``: the change did not help; agreed unless ours is better with p < 0.05.
- ``closer to GRU``: LSTM-b's forget-gate bias of 1 closes most of the gap between LSTM and GRU;
  agreed when LSTM-b's mean is nearer GRU's than half the LSTM-GRU gap.

Diverged runs (:meth:`charlm.tools.compare.records.RunResult.diverged`) are left out of the means and of the
t-test, and divergence is itself evidence: a row with a larger share of diverged seeds than the reference is
"worse" (one with a smaller share "better") whatever its other seeds score, and "we see" says so
(``1/3 seeds diverged (reference 0/3): worse``). With equal shares the surviving seeds are compared as usual.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

if TYPE_CHECKING:
    from charlm.tools.compare.summary import CellSummary

P_THRESHOLD = 0.05
STATS_EXTRA = 'pip install "charlm[stats]"'  # scipy, for the p-values

# preset -> paper row name -> (what the paper says, the kind of claim)
CLAIMS: dict[str, dict[str, tuple[str, str]]] = {
    "greff": {
        "NFG": ("no forget gate hurts significantly", "worse"),
        "NOAF": ("no output activation hurts significantly", "worse"),
        "CIFG": ("coupled input and forget gates: no significant loss", "not worse"),
        "NP": ("no peepholes: no significant loss", "not worse"),
        "FGR": ("full gate recurrence does not help", "not better"),
    },
    "jozefowicz": {
        "LSTM-b": ("a forget-gate bias of 1 closes most of the LSTM-GRU gap", "closer to GRU"),
        "MUT1": ("MUT1 matches LSTM and GRU", "same"),
    },
}


@dataclass(frozen=True)
class Difference:
    """One row against the reference on one split: mean difference (bits/char) and Welch's p, over the runs that
    did not diverge; ``diverged`` says how many did (``1/3 diverged (reference 0/3)``), where any did."""

    diff: float | None
    p: float | None
    diverged: str = ""

    @property
    def significant(self) -> bool:
        return self.p is not None and self.p < P_THRESHOLD

    def text(self) -> str:
        if self.diff is None:
            return self.diverged or "—"
        mark = " *" if self.significant else ""
        p = "" if self.p is None else f" (p={self.p:.3f})"
        note = f"; {self.diverged}" if self.diverged else ""
        return f"{self.diff:+.4f}{p}{mark}{note}"


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None with fewer than 2 values a side or without scipy."""
    if len(a) < 2 or len(b) < 2:
        return None
    try:
        from scipy.stats import ttest_ind
    except ImportError:
        return None
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:  # t is undefined; equal means: no difference
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    p = float(ttest_ind(list(a), list(b), equal_var=False).pvalue)
    return None if math.isnan(p) else p


def scipy_missing() -> bool:
    try:
        import scipy.stats  # noqa: F401
    except ImportError:
        return True
    return False


def _diverged_note(row: CellSummary, reference: CellSummary) -> str:
    """``1/3 diverged (reference 0/3)`` where either side has a diverged run, else empty."""
    if not (row.diverged or reference.diverged):
        return ""
    return f"{row.diverged_text()} diverged (reference {reference.diverged_text()})"


def difference(row: CellSummary, reference: CellSummary, metric: str) -> Difference:
    """The mean difference and Welch's p over the runs of either side that did not diverge."""
    a = [float(getattr(r, metric)) for r in row.kept]
    b = [float(getattr(r, metric)) for r in reference.kept]
    note = _diverged_note(row, reference)
    if not a or not b:
        return Difference(None, None, note)
    return Difference(statistics.fmean(a) - statistics.fmean(b), welch_p(a, b), note)


def _diverged_share(s: CellSummary) -> float:
    return len(s.diverged) / len(s.runs) if s.runs else 0.0


def _by_name(summaries: Sequence[CellSummary], name: str) -> CellSummary | None:
    return next((s for s in summaries if s.entry.name == name and s.runs), None)


def verdict(kind: str, row: CellSummary, reference: CellSummary,
            summaries: Sequence[CellSummary]) -> tuple[str, str]:
    """What this comparison shows of a claim on the test split, and whether it agrees: ("we see", "agree?").
    A larger share of diverged seeds than the reference's is "worse" (a smaller one "better"), whatever the rest."""
    if row.runs and reference.runs and _diverged_share(row) != _diverged_share(reference):
        worse = _diverged_share(row) > _diverged_share(reference)
        if worse or kind != "closer to GRU":  # fewer divergences than LSTM say nothing of the gap to GRU
            seen = (f"{row.diverged_text()} seeds diverged (reference {reference.diverged_text()}): "
                    + ("worse" if worse else "better"))
            agree = {"worse": worse, "same": False, "not worse": not worse, "not better": worse,
                     "closer to GRU": False}[kind]
            return seen, "yes" if agree else "no"
    d = difference(row, reference, "test_bpc")
    if d.diff is None:
        return "—", "—"
    if kind == "closer to GRU":
        gru, lstm = _by_name(summaries, "GRU"), reference
        if gru is None:
            return "no GRU row", "—"
        gap = lstm.mean("test_bpc") - gru.mean("test_bpc")
        left = row.mean("test_bpc") - gru.mean("test_bpc")
        seen = f"LSTM-GRU gap {gap:+.4f}, LSTM-b-GRU {left:+.4f}"
        return seen, "yes" if abs(left) <= abs(gap) / 2 else "no"
    if d.p is None:
        return f"{d.diff:+.4f} (no p-value)", "—"
    seen = "no significant difference"
    if d.significant:
        seen = "significantly " + ("worse" if d.diff > 0 else "better")
    if d.diverged:  # the same share on both sides: the surviving seeds decide
        seen += f" ({d.diverged}: the others compared)"
    agree = {"worse": d.significant and d.diff > 0, "same": not d.significant,
             "not worse": not (d.significant and d.diff > 0), "not better": not (d.significant and d.diff < 0)}[kind]
    return seen, "yes" if agree else "no"


HEADERS = ["cell", "Δ val bpc", "Δ test bpc", "paper says", "we see (test)", "agree?"]


def significance_rows(summaries: Sequence[CellSummary], preset: str | None) -> list[list[str]]:
    """One row per cell after the reference: the differences, p-values and the paper's claim."""
    if not summaries or not summaries[0].runs:
        return []
    reference = summaries[0]
    claims = CLAIMS.get((preset or "").lower(), {})
    rows = []
    for s in summaries[1:]:
        if not s.runs:
            continue
        claim = claims.get(s.entry.name)
        says, seen, agree = "—", "—", "—"
        if claim is not None:
            says = claim[0]
            seen, agree = verdict(claim[1], s, reference, summaries)
        rows.append([s.entry.name, difference(s, reference, "val_bpc").text(),
                     difference(s, reference, "test_bpc").text(), says, seen, agree])
    return rows


def significance_table(summaries: Sequence[CellSummary], preset: str | None) -> Table | None:
    """The same rows as a Rich table for the terminal, or None when there is nothing to compare."""
    rows = significance_rows(summaries, preset)
    if not rows:
        return None
    table = Table(*HEADERS, title=f"against {summaries[0].entry.name} (Welch's t-test over seeds; * p < {P_THRESHOLD})",
                  box=box.SIMPLE_HEAD)
    for row in rows:
        table.add_row(*row, style="bold" if row[-1] == "no" else None)
    return table


def significance_markdown(summaries: Sequence[CellSummary], preset: str | None) -> list[str]:
    """The markdown section for results.md (empty when there is nothing to compare)."""
    rows = significance_rows(summaries, preset)
    if not rows:
        return []
    reference = summaries[0].entry.name
    lines = [f"## Against the reference row ({reference})", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "|".join(["---"] * len(HEADERS)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", f"Δ: mean bpc minus {reference}'s (negative is better); p: Welch's t-test over seeds, "
              f"two-sided; * marks p < {P_THRESHOLD}. \"we see\" is on the test split. Diverged seeds are left out "
              f"of Δ and p; a row with a larger share of them than {reference} is worse, whatever its other seeds "
              "score."]
    if scipy_missing():
        lines += ["", f"_No p-values: scipy is not installed ({STATS_EXTRA})._"]
    return lines
