"""``gradients.csv`` and ``gradients.png`` of ``charlm gradients``.

matplotlib is optional (``pip install "charlm[plot]"``): without it :func:`plot_lag_curves` raises
:class:`charlm.util.plotting.PlottingUnavailable` saying what to install, and the CSV is still written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from charlm.tools.gradients.measure import LagCurve
from charlm.util.atomic import atomic_file, atomic_write_text
from charlm.util.plotting import INSTALL_HINT, PlottingUnavailable

COLUMNS = ("source", "cell", "init", "clip", "layer", "k", "mean_norm", "std_norm", "q10_norm", "median_norm",
           "q90_norm")


def write_csv(curves: Sequence[LagCurve], path: Path) -> None:
    """One row per curve and lag k, atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for c in curves:
        for k, row in enumerate(zip(c.mean, c.std, c.q10, c.median, c.q90, strict=True)):
            w.writerow([c.source, c.cell, c.init, f"{c.clip:g}", c.layer, k, *(f"{v:.6g}" for v in row)])
    atomic_write_text(path, buf.getvalue())


def _positive(values: Sequence[float]) -> list[float]:
    """A log axis cannot show 0 (a gradient that underflowed): such points are left out."""
    return [v if v > 0 else float("nan") for v in values]


def plot_lag_curves(curves: Sequence[LagCurve], path: Path, *, title: str) -> Path:
    """A log-scale PNG: mean gradient norm against lag k, one panel per layer, the 10-90 % band shaded."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise PlottingUnavailable(f"matplotlib is not installed ({exc}); {INSTALL_HINT}") from None
    layers = sorted({c.layer for c in curves})
    labels = list(dict.fromkeys(c.label for c in curves))
    fig = Figure(figsize=(6.0 * len(layers), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers, strict=True):
        for c in (c for c in curves if c.layer == layer):
            i = labels.index(c.label)
            style = {"color": f"C{i % 10}", "linestyle": ["-", "--", ":", "-."][(i // 10) % 4]}
            ks = range(len(c.mean))
            ax.plot(ks, _positive(c.mean), label=c.label, linewidth=1.6, **style)
            ax.fill_between(ks, _positive(c.q10), _positive(c.q90), alpha=0.12, color=style["color"], linewidth=0)
        ax.set_yscale("log")
        ax.set_xlabel("lag k (steps back from T)")
        ax.set_ylabel("|d loss_T / d h_(T-k)|  (mean; band 10-90 %)")
        ax.set_title(f"layer {layer}")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    with atomic_file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    return path
