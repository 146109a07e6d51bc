"""Training callbacks: the periodic ``last.ckpt`` and the sample printed at each validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from charlm.sampling import generate


class LastCheckpoint(Callback):
    """Refresh ``last.ckpt`` every ``every_n_steps`` steps, at each epoch end and at the end of training."""

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every_n_steps = path, every_n_steps
        self._saved_at = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


class TrackBestPath(Callback):
    """Tell the module where the last good checkpoint is (named when a run stops on a NaN loss)."""

    def __init__(self, *paths: Path) -> None:
        self.paths = paths

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        existing = [p for p in self.paths if p.is_file()]
        if existing:
            pl_module.last_good_checkpoint = str(max(existing, key=lambda p: p.stat().st_mtime))


class PrintSample(Callback):
    """After each validation, print a short sample so the user sees the model learn."""

    def __init__(self, prime: str, length: int, temperature: float, seed: int) -> None:
        self.prime, self.length, self.temperature, self.seed = prime, length, temperature, seed

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.length == 0:
            return
        model, vocab = pl_module.model, pl_module.vocab  # type: ignore[attr-defined]
        prime = "".join(c for c in self.prime if c in vocab.chars) or vocab.chars[0]
        was_training = model.training
        text = generate(model, vocab, prime, self.length, temperature=self.temperature, seed=self.seed)[0]
        model.train(was_training)
        loss = trainer.callback_metrics.get("val_loss")
        head = f"step {trainer.global_step}" + (f", val loss {float(loss):.4f}" if loss is not None else "")
        bar = trainer.progress_bar_callback
        message = f"--- sample at {head} ---\n{text}\n---"
        if bar is not None and hasattr(bar, "print"):
            bar.print(message)
        else:
            print(message)
