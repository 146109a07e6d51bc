"""Training and sampling speed: charlm (through Lightning, as ``charlm train`` runs it) against the plain
nn.LSTM loop of the same size, in the same process.

    python -m benchmarks.throughput                      # default config, 60 steps each
    python -m benchmarks.throughput --set model.weight_drop=0.2 --set model.dropouti=0.1

Prints training chars/s (steps after the first 5) and one-stream sampling chars/s, with ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.baseline import PlainLSTM, train_plain
from benchmarks.machine import describe_cpu
from charlm.config import load_config
from charlm.data.datamodule import CharDataModule
from charlm.generation.continuation import generate
from charlm.model import fast_step, fused_step
from charlm.training.fit import build_trainer
from charlm.training.lightning_module import CharLMModule
from charlm.util.threads import fast_cpu_math


class StepTimer(L.Callback):
    """Chars per second over the training steps after the first ``skip``."""

    def __init__(self, skip: int = 5) -> None:
        self.skip, self.chars, self.start, self.end = skip, 0, 0.0, 0.0
        self.seen = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.seen += 1
        if self.seen == self.skip + 1:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.seen > self.skip:
            self.chars += batch.y.numel()
            self.end = time.perf_counter()

    @property
    def chars_per_s(self) -> float:
        return self.chars / max(self.end - self.start, 1e-9)


def charlm_train_speed(overrides: list[str], config: str, steps: int) -> tuple[float, CharLMModule]:
    cfg = load_config(config, [*overrides, f"train.max_steps={steps}", "train.max_time=null",
                               "train.val_every_steps=0", "train.max_epochs=1", "train.progress=false",
                               "sample.enabled=false", "train.checkpoint_every_steps=0",
                               "train.precision=32-true"])  # float32, as the plain loop it is compared with
    fast_cpu_math(cfg.train.threads)
    data = CharDataModule(cfg.data, seed=cfg.train.seed)
    module = CharLMModule(cfg.to_dict(), data.vocab.chars)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, _ = build_trainer(cfg, Path(tmp), extra_callbacks=[timer])
        trainer.limit_val_batches = 0
        trainer.fit(module, datamodule=data)
    return timer.chars_per_s, module


def plain_sample_speed(vocab_size: int, hidden: int, layers: int, length: int) -> float:
    """nn.LSTM stepped with T = 1, the way a hand-written sampler usually does it."""
    model = PlainLSTM(vocab_size, hidden, layers).eval()
    x = torch.zeros(1, 1, dtype=torch.long)
    state = None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = time.perf_counter()
        for _ in range(length):
            logits, state = model(x, state)
            x = torch.multinomial(torch.softmax(logits[:, -1], -1), 1, generator=gen)
    return length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sample-length", type=int, default=2000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    fast_step.available()  # build (or load) the op before anything is timed, as benchmarks/sampling.py does
    cfg = load_config(args.config, args.overrides)
    data = CharDataModule(cfg.data, seed=cfg.train.seed)

    base = train_plain(data.splits.train, data.splits.val[:2000], len(data.vocab), steps=args.steps,
                       hidden=cfg.model.hidden_size, layers=cfg.model.num_layers, batch=cfg.data.batch_size,
                       bptt=cfg.data.bptt)
    ours, module = charlm_train_speed(args.overrides, args.config, args.steps)
    start = time.perf_counter()
    generate(module.model.eval(), data.vocab, "\n", args.sample_length, temperature=1.0, seed=0)
    ours_sample = args.sample_length / (time.perf_counter() - start)
    plain_sample = plain_sample_speed(len(data.vocab), cfg.model.hidden_size, cfg.model.num_layers,
                                      args.sample_length)

    m, d = cfg.model, cfg.data
    route = "fused" if fused_step.packed(module.model, fast_step.available) is not None else (
        "aten op" if fast_step.plan_for(module.model) is not None and fast_step.available() else "python")
    table = Table(title=f"{describe_cpu()}\n{m.cell} {m.num_layers}x{m.hidden_size}, batch {d.batch_size}, "
                        f"bptt {d.bptt}, {torch.get_num_threads()} threads")
    for col in ("what", "plain nn.LSTM chars/s", "charlm chars/s", "ratio"):
        table.add_column(col)
    table.add_row("training (Lightning step)", f"{base['chars_per_s']:,.0f}", f"{ours:,.0f}",
                  f"{ours / base['chars_per_s']:.2f}")
    table.add_row(f"sampling, one stream ({route} route)", f"{plain_sample:,.0f}", f"{ours_sample:,.0f}",
                  f"{ours_sample / plain_sample:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
