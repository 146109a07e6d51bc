"""Regularizer ablation at equal wall time: none, each regularizer alone, then all of them.

    python -m benchmarks.ablation --seconds 180          # 8 rows x 3 minutes on a 2-core CPU

Every row trains the same model (the default config's size, schedule and seed) for the same time and
is scored exactly on the validation split. The "all" row is the config's regularization; the "none" row
switches every regularizer off; each row between turns one on alone (at the config's value, or at the
AWD-LSTM paper's value where the config leaves it off). Chars/s is the median training speed of the row, so the
last column shows what each regularizer costs in throughput.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from charlm.config import load_config
from charlm.data.datamodule import CharDataModule
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.checkpoint import load_model
from charlm.training.fit import train

OFF = {"model.dropout": 0.0, "model.dropouth": 0.0, "model.dropouti": 0.0, "model.dropoute": 0.0,
       "model.weight_drop": 0.0, "optim.alpha": 0.0, "optim.beta": 0.0}


# a regularizer the config leaves off is tried alone at the AWD-LSTM paper's value
PAPER = {"model.dropout": 0.1, "model.dropouth": 0.1, "model.dropouti": 0.1, "model.dropoute": 0.05,
         "model.weight_drop": 0.2, "optim.alpha": 2.0, "optim.beta": 1.0}
LABELS = {"model.dropout": "output", "model.dropouth": "between", "model.dropouti": "input",
          "model.dropoute": "embedding", "model.weight_drop": "weightdrop", "optim.alpha": "AR", "optim.beta": "TAR"}


def rows_for(config: str) -> list[tuple[str, dict[str, float]]]:
    """(name, overrides) per row: none, each regularizer alone (the config's value, else the paper's), all."""
    cfg = load_config(config)
    on = {key: getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]) for key in OFF}
    rows: list[tuple[str, dict[str, float]]] = [("none", dict(OFF))]
    for key, value in on.items():
        alone = value or PAPER[key]
        rows.append((f"{LABELS[key]} {alone:g}", {**OFF, key: alone}))
    rows.append(("all", on))
    return rows


def median_speed(metrics: Path) -> float:
    with metrics.open() as fh:
        speeds = [float(r["train_chars_per_s"]) for r in csv.DictReader(fh) if r.get("train_chars_per_s")]
    return statistics.median(speeds) if speeds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--only", help="comma-separated rows to run: none, output, between, input, embedding, "
                                       "weightdrop, AR, TAR, all (default: every row)")
    args = parser.parse_args()
    console = Console()
    table = Table(title=f"regularizer ablation, {args.config} config, {args.seconds:.0f} s per row")
    for col in ("row", "steps", "val loss (nats/char)", "val bpc", "train chars/s", "speed vs none"):
        table.add_column(col)
    base_speed = None
    for name, overrides in rows_for(args.config):
        if args.only and name.split()[0] not in args.only.split(","):
            continue
        sets = [f"{k}={v}" for k, v in overrides.items()]
        cfg = load_config(args.config, [*sets, f"train.max_time={args.seconds}", "train.progress=false",
                                        "sample.enabled=false"])
        with tempfile.TemporaryDirectory() as tmp:
            cfg.train.out, cfg.train.name = tmp, "row"
            result = train(cfg)
            model, _, _, _ = load_model(result.best_checkpoint)
            data = CharDataModule(cfg.data, seed=cfg.train.seed)
            val = evaluate_ids(model, data.splits.val, batch_size=16, bptt=128)
            speed = median_speed(result.run_dir / "metrics.csv")
        base_speed = base_speed or speed
        table.add_row(name, str(result.steps), f"{val['loss']:.4f}", f"{val['bpc']:.4f}", f"{speed:,.0f}",
                      f"{speed / base_speed:.2f}")
        console.print(f"{name}: val loss {val['loss']:.4f}, {speed:,.0f} chars/s")
    console.print(table)


if __name__ == "__main__":
    main()
