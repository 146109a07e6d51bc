"""What a user watches while a run trains: one progress bar over the whole step budget with the time left at
the recent rate (:class:`ProgressBar`, :class:`TimeLeftColumn`), the time the budget will take once its first
steps are timed (:class:`TimeEstimate`), and printing a line above the bar (:func:`print_above_bar`)."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar, Timer
from rich.markup import escape
from rich.progress import ProgressColumn, Task
from rich.text import Text


class TimeLeftColumn(ProgressColumn):
    """``3:05 elapsed, about 24:40 left`` (Rich's estimate of the time left, at the recent rate)."""

    max_refresh = 0.5  # seconds: an estimate that jitters reads worse than one a moment old

    def __init__(self, style: Any) -> None:
        super().__init__()
        self.style = style

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        left = task.time_remaining
        text = "-:--" if elapsed is None else _clock(elapsed)
        if not task.finished:
            text += f" elapsed, about {_clock(left)} left" if left is not None else " elapsed"
        return Text(text, style=self.style)


def _clock(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:05``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressBar(RichProgressBar):
    """Lightning's rich bar over the whole run: the steps done of the run's budget (``train.max_steps``, or the
    epochs' batches when only ``train.max_epochs`` bounds it), not of one epoch, with the time left at the
    recent rate (Rich's estimate over its last 30 seconds, so it follows the machine: a run that shared the CPU
    at first catches up in the estimate). A run bounded only by ``train.max_time`` keeps Lightning's bar per
    epoch; the time left is then the clock's.

    Its description reads "Epoch 3", never Lightning's "Epoch 3/-2" for a run without an epoch limit. A resumed
    run's bar starts at the step it resumed from.
    """

    def __init__(self) -> None:
        super().__init__(leave=True)
        self._shown_epoch = -1

    @staticmethod
    def budget(trainer: L.Trainer) -> int | None:
        """The run's steps in all, where a step or epoch limit gives them (the first limit reached)."""
        limits = []
        if trainer.max_steps > 0:
            limits.append(trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and batches != float("inf"):
            limits.append(trainer.max_epochs * int(batches))
        return min(limits, default=None)

    def configure_columns(self, trainer: L.Trainer) -> list[Any]:
        """Lightning's columns, its unlabelled "elapsed • remaining" replaced by :class:`TimeLeftColumn`."""
        columns = super().configure_columns(trainer)
        time_column = type(columns[3])
        return [TimeLeftColumn(self.theme.time) if isinstance(c, time_column) else c for c in columns]

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{max_epochs - 1}" if max_epochs is not None and max_epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"  # as wide as "Validation": no flicker

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        budget = self.budget(trainer)
        if budget is None:
            super().on_train_epoch_start(trainer, pl_module)
        elif not self.is_disabled:
            self._budget_task(trainer, budget)
            self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        budget = self.budget(trainer)
        if budget is None:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled:
            self._budget_task(trainer, budget)
            self._update(self.train_progress_bar_id, trainer.global_step)
            self._update_metrics(trainer, pl_module)
            self.refresh()

    def _budget_task(self, trainer: L.Trainer, budget: int) -> None:
        """The one training task of the run (made once, at the step the run starts from), its epoch named; the caller
        refreshes the bar."""
        if self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(budget, "")
            self.progress.reset(self.train_progress_bar_id, completed=trainer.global_step)  # the rate from here
            self._shown_epoch = -1
        if trainer.current_epoch != self._shown_epoch:
            self._shown_epoch = trainer.current_epoch
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))


def print_above_bar(trainer: L.Trainer, message: str) -> None:
    """Print a line above the progress bar when there is one (rich would read "[...]" as markup)."""
    bar = trainer.progress_bar_callback
    if bar is not None and hasattr(bar, "print"):
        bar.print(escape(message))
    else:
        print(message, flush=True)


class TimeEstimate(Callback):
    """Once the first steps of a step-limited run are timed, print how long the rest will take here.

    The first ``skip`` steps (warm-up: allocation, the kernels' first calls) are left out of the timing;
    the next ``measure`` steps set the rate. Validations are not in it: they come on top.
    """

    def __init__(self, chars_per_step: int, skip: int = 5, measure: int = 20) -> None:
        self.chars_per_step, self.skip, self.measure = chars_per_step, skip, measure
        self._first_step: int | None = None
        self._timed_from: tuple[int, float] | None = None  # (step, clock) where the timing began
        self.printed: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._first_step = trainer.global_step  # a resumed run is timed from where it resumed

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.printed is not None or trainer.max_steps <= 0 or not trainer.is_global_zero:
            return
        step, now = trainer.global_step, time.perf_counter()
        if self._first_step is None:
            return
        if self._timed_from is None:
            if step - self._first_step >= self.skip:
                self._timed_from = (step, now)
            return
        first, began = self._timed_from
        if step - first < self.measure:
            return
        per_step = (now - began) / (step - first)
        seconds = max(trainer.max_steps - step, 0) * per_step
        finish = (dt.datetime.now() + dt.timedelta(seconds=seconds)).strftime("%H:%M")
        chars_per_s = self.chars_per_step * trainer.world_size / per_step
        self.printed = (f"time: {trainer.max_steps - step:,} steps to go at {per_step:.3g} s a step "
                        f"({chars_per_s:,.0f} chars/s): about {format_minutes(seconds)} here, done near {finish} "
                        "(validations not counted)")
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        left = None if timer is None else timer.time_remaining("train")
        if left is not None and left < seconds:
            self.printed += (f"; the time limit stops it first, in {format_minutes(left)}, "
                             f"near step {step + int(left / per_step):,}")
        print_above_bar(trainer, self.printed)


def format_minutes(seconds: float) -> str:
    """``"40 s"``, ``"14 min"``, ``"1 h 05 min"``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
