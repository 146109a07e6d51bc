"""Training callbacks: ``last.ckpt`` (:class:`LastCheckpoint`), a clean stop on Ctrl-C / SIGTERM
(:class:`StopOnInterrupt`), the last good checkpoint (:class:`TrackBestPath`) and the sample printed at each
validation (:class:`PrintSample`). The progress bar and the time estimate are in :mod:`charlm.training.progress`."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.callbacks import Callback, Checkpoint

from charlm.generation.continuation import generate
from charlm.training.loggers import log_text
from charlm.training.progress import print_above_bar
from charlm.util.errors import TrainingInterrupted
from charlm.util.threads import on_main_thread


class LastCheckpoint(Checkpoint):
    """Refresh ``last.ckpt`` every ``every_n_steps`` steps, at each epoch end and at the end of training.

    The epoch-end copy is written after the epoch's last batch (``on_train_batch_end``), not in
    ``on_train_epoch_end``: Lightning 2.6 resumes a step-limited run from a checkpoint written in
    ``on_train_epoch_end`` by training one extra batch in the finished epoch, while from a batch-end
    checkpoint it starts the next epoch exactly. ``on_train_epoch_end`` is only the fallback for an epoch
    that ended without Lightning seeing its last batch coming.

    When a validation follows the step, the checkpoint is written at the end of that validation instead,
    so that it holds the step's validation: Lightning resumes from a checkpoint of a step whose validation
    was due as if that validation had run, so one written before it (then a kill during the validation)
    would lose that validation for good. As a :class:`Checkpoint`, Lightning runs this callback after the
    others, ``best.ckpt``'s ``ModelCheckpoint`` included, so the saved state holds their view of that
    validation too (the best score so far, NT-ASGD's decision).
    """

    def __init__(self, path: Path, every_n_steps: int) -> None:
        self.path, self.every_n_steps = path, every_n_steps
        self._saved_at = -1
        self._after_validation = False

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
            self.save_now_or_after_validation(trainer)

    def save_now_or_after_validation(self, trainer: L.Trainer) -> bool:
        """Save at the end of this step's validation if one follows (``True``), else now (``False``)."""
        if validation_follows(trainer):
            self._after_validation = True
            return True
        self.save(trainer)
        return False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_after_the_batches(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_after_the_batches(trainer)

    def save_after_the_batches(self, trainer: L.Trainer) -> None:
        """Save once the batch loop has ended: at an epoch's end, or where the budget stopped it mid-epoch.

        The loggers' step count (Lightning's ``_batches_that_stepped``) has then gone past the last batch,
        while a run resumed from a checkpoint of a batch that did not end its epoch expects the count a
        batch-end checkpoint holds (one less than the global step) and adds one to it: saved as it is, every
        step logged after resuming a run that spent its budget would be one too late, and its training losses
        logged at other batches than the unbroken run's. So a mid-epoch checkpoint written here holds the
        batch-end count. (Private API, checked with Lightning 2.6: ``_TrainingEpochLoop.reset``.)"""
        loop = trainer.fit_loop.epoch_loop
        if loop.batch_progress.is_last_batch or trainer.global_step == self._saved_at:
            self.save(trainer)
            return
        counted = loop._batches_that_stepped
        loop._batches_that_stepped = trainer.global_step - 1
        try:
            self.save(trainer)
        finally:
            loop._batches_that_stepped = counted


def validation_follows(trainer: L.Trainer) -> bool:
    """Whether Lightning validates right after the training step that just ended (asked in
    ``on_train_batch_end``), by Lightning's own rule. Private API, checked with Lightning 2.6:
    ``_TrainingEpochLoop._should_check_val_fx`` and ``_FitLoop._data_fetcher``;
    tests/test_resume.py::test_a_run_killed_during_a_validation_validates_again_on_resume fails if they change.
    """
    fit_loop = trainer.fit_loop
    return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))


def resume_command(checkpoint: Path) -> str:
    """The exact command that continues a run from ``checkpoint``."""
    return f"charlm train --resume {shlex.quote(str(checkpoint.resolve()))}"


class StopOnInterrupt(Callback):
    """Ctrl-C or SIGTERM stops training cleanly: the step under way finishes, ``last.ckpt`` is saved, the
    run stops with the resume command.

    Lightning's own answers can catch the run half-way through an optimizer step (Ctrl-C: a
    ``KeyboardInterrupt`` wherever it lands, then ``sys.exit(1)``) or stop it without saving and with exit
    code 0 (SIGTERM, what ``kill`` and job schedulers send). This callback takes both signals while
    training runs (installed at ``on_train_start``, after Lightning installed its own): the first one
    only sets a flag; at the end of the training step under way (after its validation, if one follows:
    see :class:`LastCheckpoint`) the checkpoint is saved and :class:`TrainingInterrupted` (whose message
    gives the resume command; exit code 130 for Ctrl-C, 143 for SIGTERM) ends ``fit``. A second signal
    stops at once, as Lightning would on Ctrl-C, without saving (``on_exception`` then names the last
    checkpoint there is).
    Under DDP the processes agree at each step end, so when any of them got the signal they all save and
    stop together.
    """

    SIGNALS: ClassVar[dict[signal.Signals, tuple[str, int]]] = {signal.SIGINT: ("Ctrl-C", 130),
                                                                signal.SIGTERM: ("SIGTERM", 143)}

    def __init__(self, last: LastCheckpoint) -> None:
        self.last = last
        self.requested: signal.Signals | None = None
        self._stopping: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._installed = False
        self._speaks = True  # the first DDP process only

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._speaks = trainer.is_global_zero
        self.requested = self._stopping = None
        if stage == "fit" and on_main_thread():
            # the handlers in place before Lightning's, put back when training ends
            self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previous and not self._installed:
            for signum in self.SIGNALS:
                signal.signal(signum, self._on_signal)
            self._installed = True

    def _restore(self) -> None:
        if self._installed:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._installed = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:  # the second signal: stop now
            signal.default_int_handler(signum, frame)
        self.requested = signal.Signals(signum)
        if self._speaks:
            what = self.SIGNALS[self.requested][0]
            print(f"\n{what}: finishing this step, then saving last.ckpt and stopping ({what} again: stop at "
                  "once, without saving)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requested = self.requested
        stop = requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        self._stopping = requested or signal.SIGTERM  # another process got it: a scheduler's stop
        if not self.last.save_now_or_after_validation(trainer):
            self._stop(trainer)
        # else the step's validation runs first (a checkpoint before it would lose it), then this stops

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._stopping is not None:  # the validation has run and last.ckpt holds it
            self._stop(trainer)

    def _stop(self, trainer: L.Trainer) -> None:
        what, code = self.SIGNALS[self._stopping or signal.SIGTERM]
        raise TrainingInterrupted(f"training interrupted by {what} at step {trainer.global_step}; saved "
                                  f"{self.last.path}.\nResume with: {resume_command(self.last.path)}", code)

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
    """After each validation, print a short sample so the user sees the model learn (and add it to the
    run's TensorBoard, when it has one: :func:`charlm.training.loggers.log_text`).

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
        log_text(trainer, "sample", text)
        loss = trainer.callback_metrics.get("val_loss")
        head = f"step {trainer.global_step}" + (f", val loss {float(loss):.4f}" if loss is not None else "")
        print_above_bar(trainer, f"--- sample at {head} ---\n{text}\n---")
