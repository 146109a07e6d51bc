"""``curves.png`` of ``charlm compare``: validation bits per character against step and against wall time.

matplotlib is an optional extra (``pip install "charlm[plot]"``). Without it :func:`plot_curves` raises
:class:`PlottingUnavailable`, which says how to install it; callers write everything else and print
that note. Only the object-oriented API is used (``Figure`` + the Agg canvas), so plotting never
touches pyplot's global state or the user's interactive backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from charlm.tools.compare.plan import Entry
from charlm.tools.compare.records import RunResult
from charlm.util.atomic import atomic_file
from charlm.util.plotting import INSTALL_HINT, PlottingUnavailable


@dataclass(frozen=True)
class Curve:
    """One training run's validation points. Runs with the same ``label`` share a colour and a legend entry.

    ``seconds`` is the training time logged with each point; a point whose time is ``None`` (not logged)
    is drawn against its step only.
    """

    label: str
    steps: Sequence[float]
    seconds: Sequence[float | None]
    bpc: Sequence[float]


# The y axis ends at this many times the median of the curves' highest points, so that a run that diverged
# (thousands of bits per character) does not flatten every other curve; those that leave it are named.
Y_RANGE = 1.5


def y_limits(curves: Sequence[Curve]) -> tuple[float, float, list[str]]:
    """(bottom, top) of the shared y axis and the labels of the curves that go above the top."""
    highs = sorted(max(c.bpc) for c in curves if c.bpc)
    lows = [min(c.bpc) for c in curves if c.bpc]
    if not highs:
        return 0.0, 1.0, []
    top = min(highs[-1], Y_RANGE * highs[len(highs) // 2])
    bottom = min(lows)
    margin = 0.05 * (top - bottom) or 0.05
    above = list(dict.fromkeys(c.label for c in curves if c.bpc and max(c.bpc) > top))
    return bottom - margin, top + margin, above


def plot_curves(curves: Sequence[Curve], path: Path, *, title: str | None = None) -> Path:
    """Write a two-panel PNG (val bpc vs. optimizer step, vs. logged training wall time) to ``path``, atomically."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlottingUnavailable(f"matplotlib is not installed ({exc}); {INSTALL_HINT}") from None

    labels = list(dict.fromkeys(c.label for c in curves))  # first-seen order = table order
    palette = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(12.0, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for curve in curves:
        i = labels.index(curve.label)
        style = {"color": palette[i % len(palette)], "linestyle": styles[(i // len(palette)) % len(styles)],
                 "marker": "o", "markersize": 3, "linewidth": 1.6, "alpha": 0.9}
        first = next(c for c in curves if c.label == curve.label) is curve
        by_step.plot(curve.steps, curve.bpc, label=curve.label if first else "_nolegend_", **style)
        timed = [(t, b) for t, b in zip(curve.seconds, curve.bpc, strict=True) if t is not None]
        by_time.plot([t for t, _ in timed], [b for _, b in timed], label="_nolegend_", **style)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall time (s)")
    by_step.set_ylabel("validation bits per character")
    by_step.set_title("against steps")
    by_time.set_title("against wall time")
    bottom, top, above = y_limits(curves)
    for ax in (by_step, by_time):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom, top)
    if above:
        by_step.text(0.02, 0.98, f"above the top of the axis: {', '.join(above)}", transform=by_step.transAxes,
                     va="top", fontsize="small", color="0.3")
    if labels:
        fig.legend(loc="outside right upper", title="cell", fontsize="small")
    if title:
        fig.suptitle(title)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, dpi=120, format="png")
    return Path(path)


def plot_runs(out: Path, runs: Sequence[RunResult], entries: Sequence[Entry]) -> tuple[Path | None, str | None]:
    """``<out>/curves.png`` (one colour per cell, in table order), or ``(None, why not)`` when matplotlib
    is missing."""
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
