"""Val loss at equal wall time: ``charlm train`` (a config) against the plain nn.LSTM loop.

    python -m benchmarks.quality --seconds 840                # the default config's model, 14 minutes each
    python -m benchmarks.quality --seconds 120 --set model.weight_drop=0.2

Both train on the same 90 % split and are scored exactly on the same 5 % validation split. Prints a
table and the ratio charlm / baseline (below 1 is better).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.baseline import train_plain
from charlm.config import load_config
from charlm.data.datamodule import CharDataModule
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.checkpoint import load_model
from charlm.training.fit import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--seconds", type=float, default=840.0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-lr", type=float, default=2e-3)
    args = parser.parse_args()

    cfg = load_config(args.config, [*args.overrides, f"train.max_time={args.seconds}", "train.progress=false",
                                    "sample.enabled=false"])
    data = CharDataModule(cfg.data, seed=cfg.train.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.out, cfg.train.name = tmp, "quality"
        start = time.perf_counter()
        result = train(cfg)
        wall = time.perf_counter() - start
        model, _, _, _ = load_model(result.best_checkpoint)
        val = evaluate_ids(model, data.splits.val, batch_size=16, bptt=128)
        m = cfg.model
        rows.append((f"charlm {args.config} ({m.cell} {m.num_layers}x{m.hidden_size})", result.steps, wall,
                     val["loss"], val["bpc"]))
    if not args.skip_baseline:
        base = train_plain(data.splits.train, data.splits.val, len(data.vocab), seconds=args.seconds,
                           hidden=cfg.model.hidden_size, layers=cfg.model.num_layers, batch=cfg.data.batch_size,
                           bptt=cfg.data.bptt, lr=args.baseline_lr)
        rows.append((f"plain nn.LSTM {cfg.model.num_layers}x{cfg.model.hidden_size}, Adam {args.baseline_lr:g}",
                     int(base["steps"]), base["seconds"], base["val_loss"], base["val_bpc"]))
    table = Table(title=f"val loss at {args.seconds:.0f} s ({torch.get_num_threads()} threads)")
    for col in ("model", "steps", "wall s", "val loss (nats/char)", "val bpc", "ratio to baseline"):
        table.add_column(col)
    ref = rows[-1][3]
    for name, steps, wall_s, loss, bpc in rows:
        table.add_row(name, str(steps), f"{wall_s:.0f}", f"{loss:.4f}", f"{bpc:.4f}", f"{loss / ref:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
