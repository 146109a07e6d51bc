"""The frontier: best validation bpc per CPU-minute, charlm against a plain nn.LSTM and a transformer.

    python -m benchmarks.frontier --budgets 2,5,15                 # every system at 2, 5 and 15 minutes
    python -m benchmarks.frontier --budgets 0.2 --systems charlm,transformer --out /tmp/f   # a quick check

Every system trains on the same 90 % split of the same corpus for the same wall time and is scored by
the same code (:func:`charlm.evaluate.evaluate_ids`, every character of the 5 % validation split once):

- ``charlm``: ``charlm train`` with the default recipe, sized per budget (``CHARLM_SIZES``);
- ``mogrifier``: the same recipe with ``model.cell=mogrifier`` (skipped where that cell is not registered);
- ``plain``: the hand-written nn.LSTM of ``benchmarks/baseline.py`` (2 x 256, Adam 2e-3);
- ``transformer``: the nanoGPT-style decoder of ``benchmarks/transformer.py``, sized per budget
  (``TRANSFORMER_SIZES``).

The sizes per budget are the starting points written below; how they were chosen (and any tuning runs)
belongs in ``benchmarks/results/frontier.md`` beside the figures. Prints a table, writes
``frontier.json`` and ``frontier.png`` (val bpc against minutes, log x; needs matplotlib) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.baseline import train_plain
from benchmarks.transformer import TransformerConfig, train_transformer
from charlm.checkpoint import load_model
from charlm.config import load_config
from charlm.datamodule import CharDataModule
from charlm.evaluate import evaluate_ids
from charlm.train import train

# minutes at most -> config overrides of charlm's default recipe (the smallest budget that fits is used)
CHARLM_SIZES: list[tuple[float, list[str]]] = [
    (3, ["model.hidden_size=192", "model.embedding_size=192", "train.val_every_steps=100"]),
    (8, ["train.val_every_steps=200"]),
    (float("inf"), []),
]
# minutes at most -> transformer size and learning rate
TRANSFORMER_SIZES: list[tuple[float, TransformerConfig]] = [
    (3, TransformerConfig(layers=3, width=128, heads=4, block=128, lr=2e-3)),
    (8, TransformerConfig(layers=4, width=128, heads=4, block=128, lr=1.5e-3)),
    (float("inf"), TransformerConfig(layers=4, width=192, heads=6, block=128, lr=1e-3)),
]
SYSTEMS = ("charlm", "mogrifier", "plain", "transformer")


def sized(table: list[tuple[float, Any]], minutes: float) -> Any:
    return next(value for limit, value in table if minutes <= limit)


def run_charlm(minutes: float, data: CharDataModule, extra: list[str]) -> dict[str, Any]:
    overrides = [*sized(CHARLM_SIZES, minutes), *extra, f"train.max_time={minutes * 60}", "train.max_steps=-1",
                 "train.progress=false", "sample.enabled=false"]
    cfg = load_config("default", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.out, cfg.train.name = tmp, "frontier"
        result = train(cfg)
        model, _, _, _ = load_model(result.best_checkpoint)
        val = evaluate_ids(model, data.splits.val, batch_size=16, bptt=128)
    m = cfg.model
    return {"size": f"{m.cell} {m.num_layers}x{m.hidden_size}", "steps": result.steps,
            "parameters": result.parameters, "val_loss": val["loss"], "val_bpc": val["bpc"]}


def run_system(system: str, minutes: float, data: CharDataModule, base: list[str]) -> dict[str, Any] | None:
    """One system trained for ``minutes``; ``base``: config overrides every charlm run gets (the corpus)."""
    if system == "charlm":
        return run_charlm(minutes, data, base)
    if system == "mogrifier":
        from charlm.cells import CELLS

        return run_charlm(minutes, data, [*base, "model.cell=mogrifier"]) if "mogrifier" in CELLS else None
    if system == "plain":
        r = train_plain(data.splits.train, data.splits.val, len(data.vocab), seconds=minutes * 60)
        return {"size": "nn.LSTM 2x256", "steps": int(r["steps"]), "parameters": None, "val_loss": r["val_loss"],
                "val_bpc": r["val_bpc"]}
    c = sized(TRANSFORMER_SIZES, minutes)
    r = train_transformer(data.splits.train, data.splits.val, len(data.vocab), c, seconds=minutes * 60)
    return {"size": f"{c.layers}x{c.width}, {c.heads} heads, block {c.block}, lr {c.lr:g}", "steps": int(r["steps"]),
            "parameters": int(r["parameters"]), "val_loss": r["val_loss"], "val_bpc": r["val_bpc"]}


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in SYSTEMS:
        points = sorted((r["minutes"], r["val_bpc"]) for r in rows if r["system"] == system)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
    ax.set_xscale("log")
    budgets = sorted({r["minutes"] for r in rows})
    ax.set_xticks(budgets, [f"{m:g}" for m in budgets])  # the budgets themselves, not powers of ten
    ax.minorticks_off()
    ax.set_xlabel("training minutes (wall time, CPU)")
    ax.set_ylabel("validation bits per character")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="2,5,15", help="comma-separated minutes")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--data", default=None, help="corpus (default: tiny Shakespeare, as `charlm data` finds it)")
    parser.add_argument("--out", default="frontier", help="folder for frontier.json and frontier.png")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    base = [] if args.data is None else [f"data.path={json.dumps(args.data)}"]
    cfg = load_config("default", base)
    data = CharDataModule(cfg.data, seed=cfg.train.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for minutes in budgets:
        for system in systems:
            result = run_system(system, minutes, data, base)
            if result is not None:
                rows.append({"system": system, "minutes": minutes, **result})
                (out / "frontier.json").write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows},
                                                              indent=1) + "\n")
    table = Table(title=f"val bpc at equal wall time ({torch.get_num_threads()} threads)")
    for col in ("minutes", "system", "size", "steps", "val bpc", "best at this budget"):
        table.add_column(col)
    for minutes in budgets:
        here = [r for r in rows if r["minutes"] == minutes]
        best = min(here, key=lambda r: r["val_bpc"])["system"] if here else None
        for r in here:
            table.add_row(f"{minutes:g}", r["system"], r["size"], str(r["steps"]), f"{r['val_bpc']:.4f}",
                          "★" if r["system"] == best else "")
    Console().print(table)
    if not plot(rows, out / "frontier.png"):
        Console().print("matplotlib is not installed: no frontier.png (pip install \"charlm[plot]\")")


if __name__ == "__main__":
    main()
