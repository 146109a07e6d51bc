"""Training callbacks: the periodic ``last.ckpt``, the sample printed at each validation, the progress bar."""

from __future__ import annotations

import csv
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from rich.markup import escape

from charlm.errors import TrainingInterrupted
from charlm.sampling import generate


class ProgressBar(RichProgressBar):
    """Lightning's rich bar, whose epoch reads "Epoch 3" when the run has no epoch limit (not "Epoch 3/-2")."""

    def _get_train_description(self, current_epoch: int) -> str:
        text = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 0:
            text = text.replace(f"/{max_epochs - 1}", "", 1)
        return text


class LastCheckpoint(Callback):
    """Refresh ``last.ckpt`` every ``every_n_steps`` steps, at each epoch end and at the end of training.

    The epoch-end copy is written after the epoch's last batch (``on_train_batch_end``), not in
    ``on_train_epoch_end``: Lightning 2.6 resumes a step-limited run from a checkpoint written in
    ``on_train_epoch_end`` by training one extra batch in the finished epoch, while from a batch-end
    checkpoint it starts the next epoch exactly. ``on_train_epoch_end`` is only the fallback for an epoch
    that ended without Lightning seeing its last batch coming.
    """

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every_n_steps = path, every_n_steps
        self._saved_at = -1

    def save(self, trainer: L.Trainer) -> None:
        if trainer.global_step != self._saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)
            self._saved_at = trainer.global_step
            for logger in trainer.loggers:  # the metrics up to the checkpoint survive a kill, too
                logger.save()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        last_of_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last_of_epoch or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing ``metrics.csv``; this one continues it (a resumed run),
    dropping only the rows from the first step the new session logs onward (logged again now)."""

    def _check_log_dir_exists(self) -> None:
        self._pending_trim = self._fs.isfile(self.metrics_file_path)
        if self._pending_trim:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(header)

    def save(self) -> None:
        if self.metrics and self._pending_trim:
            self._pending_trim = False
            first = min(float(m["step"]) for m in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                rows = [r for r in csv.DictReader(file) if not r.get("step") or float(r["step"]) < first]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)
        super().save()


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<run>/metrics.csv``; with ``keep`` (a resumed run) it continues the file."""

    def __init__(self, run_dir: Path, *, keep: bool = False) -> None:
        super().__init__(run_dir, name="", version="")
        self.keep = keep

    @property  # type: ignore[misc]
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None and self.keep:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return super().experiment


def resume_command(checkpoint: Path) -> str:
    """The exact command that continues a run from ``checkpoint``."""
    return f"charlm train --resume {shlex.quote(str(checkpoint.resolve()))}"


class StopOnInterrupt(Callback):
    """Ctrl-C stops training cleanly: the step under way finishes, ``last.ckpt`` is saved, the run stops.

    Lightning's own answer to Ctrl-C (``KeyboardInterrupt`` wherever it lands, then ``sys.exit(1)``) can
    catch the run half-way through an optimizer step, so a checkpoint saved then could hold a torn
    state. This callback takes SIGINT while ``fit`` runs: the first Ctrl-C only sets a flag; at the end
    of the training step under way the checkpoint is saved and :class:`TrainingInterrupted` (whose
    message gives the resume command; exit code 130) ends ``fit``. A second Ctrl-C stops at once, as
    Lightning would, without saving (``on_exception`` then names the last checkpoint there is).
    Under DDP every process gets the signal; the processes agree at each step end, so they save and
    stop together.
    """

    def __init__(self, last: LastCheckpoint) -> None:
        self.last = last
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._speaks = True  # the first DDP process only

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._speaks = trainer.is_global_zero
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now
            signal.default_int_handler(signum, frame)
        self.requested = True
        if self._speaks:
            print("\nCtrl-C: finishing this step, then saving last.ckpt and stopping (Ctrl-C again: stop at "
                  "once, without saving)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        self.last.save(trainer)
        raise TrainingInterrupted(f"training interrupted by Ctrl-C at step {trainer.global_step}; saved "
                                  f"{self.last.path}.\nResume with: {resume_command(self.last.path)}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            if self.last.path.is_file():
                hint = f"the last checkpoint is {self.last.path}.\nResume with: {resume_command(self.last.path)}"
            else:
                hint = "no checkpoint was saved yet"
            print(f"\nstopped at once, without saving; {hint}", file=sys.stderr, flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()


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
    """After each validation, print a short sample so the user sees the model learn.

    A ``sample.prime`` with characters outside the corpus's vocabulary does not stop training (the
    default prime need not suit every corpus): a warning names them once, at the start of training, and
    the samples start from the prime's known characters (the vocabulary's first one if none is known).
    """

    def __init__(self, prime: str, length: int, temperature: float, seed: int) -> None:
        self.prime, self.length, self.temperature, self.seed = prime, length, temperature, seed
        self.usable_prime = prime

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        vocab = pl_module.vocab  # type: ignore[attr-defined]
        self.usable_prime = "".join(c for c in self.prime if c in vocab.chars) or vocab.chars[0]
        problem = vocab.describe_unknown(self.prime, what=f"sample.prime {self.prime!r}")
        if problem and trainer.is_global_zero and self.length > 0:
            print(f"warning: {problem}; the samples printed during training start from {self.usable_prime!r} "
                  "instead (set sample.prime to choose another)", file=sys.stderr, flush=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.length == 0:
            return
        model, vocab = pl_module.model, pl_module.vocab  # type: ignore[attr-defined]
        was_training = model.training
        text = generate(model, vocab, self.usable_prime, self.length, temperature=self.temperature,
                        seed=self.seed)[0]
        model.train(was_training)
        loss = trainer.callback_metrics.get("val_loss")
        head = f"step {trainer.global_step}" + (f", val loss {float(loss):.4f}" if loss is not None else "")
        bar = trainer.progress_bar_callback
        message = f"--- sample at {head} ---\n{text}\n---"
        if bar is not None and hasattr(bar, "print"):
            bar.print(escape(message))  # rich would read "[...]" in the text as markup
        else:
            print(message)
