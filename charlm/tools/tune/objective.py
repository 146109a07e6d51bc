"""One trial of ``charlm tune``: one real ``charlm.training.fit.train`` run in its own folder, scored by its best
validation loss, and pruned from its validation curve.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import optuna
from optuna.trial import FrozenTrial, TrialState

from charlm.config import Config, validate
from charlm.tools.tune.space import SearchSpace, with_values
from charlm.training.fit import train
from charlm.training.precision import for_comparison
from charlm.util.errors import CharlmError, TrainingInterrupted

# user attributes of a trial (what the table and the resume rules read)
ERROR_ATTR = "error"  # the trial's own training refused or failed: it counts as done, with this message
STOPPED_ATTR = "stopped"  # interrupted (a signal, a killed process): it does not count, another trial replaces it
RUN_DIR_ATTR = "run_dir"
HOST_ATTR, PID_ATTR = "host", "pid"  # the process running it, to tell a dead one from a live one on resume
# the states of a trial that counts towards --trials, besides FAIL with ERROR_ATTR (see charlm.tools.tune.study)
_STATES_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def counts(trial: FrozenTrial) -> bool:
    """Whether ``trial`` counts towards ``--trials``: done, failed by its own training, or under way."""
    return trial.state in _STATES_COUNTED or (trial.state == TrialState.FAIL and ERROR_ATTR in trial.user_attrs)


class TrialFailed(Exception):
    """The trial's training ended with a :class:`CharlmError` (a non-finite loss, a setting the config
    refuses): Optuna records the trial as FAIL and the study goes on."""


def trial_folder(number: int) -> str:
    return f"trial-{number:04d}"


class PruneOnValidation(L.Callback):
    """Report each validation's ``val_loss`` to the Optuna trial; when its pruner says so, stop training.

    Written against Lightning's public ``Callback`` API rather than taken from optuna-integration's
    ``PyTorchLightningPruningCallback``: that is a separate package, and it raises ``TrialPruned`` inside
    ``fit``, where Lightning's exception path skips the end of the run. Here the run stops as a budget stops it
    (``trainer.should_stop``, Lightning's ``EarlyStopping`` mechanism): ``last.ckpt``, ``metrics.csv`` and
    ``best.ckpt`` are written, the run folder's lock released, and the caller raises ``TrialPruned`` after.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.pruned_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if trainer.sanity_checking or loss is None or self.pruned_at is not None:
            return
        self.trial.report(float(loss), trainer.global_step)
        if self.trial.should_prune():
            self.pruned_at = trainer.global_step
            trainer.should_stop = True


@dataclass(frozen=True)
class Objective:
    """Train one trial: ``base`` with the trial's draw of ``space``, in ``<study_dir>/trial-NNNN``."""

    base: Config
    space: SearchSpace
    study_dir: Path

    def __call__(self, trial: optuna.Trial, started: Callable[[], None] = lambda: None) -> float:
        trial.set_user_attr(HOST_ATTR, socket.gethostname())
        trial.set_user_attr(PID_ATTR, os.getpid())

        pruning = PruneOnValidation(trial)
        try:
            started()  # the trial exists and says whose it is: other workers may ask for theirs now
            params = self.space.suggest(trial)
            name = trial_folder(trial.number)
            trial.set_user_attr(RUN_DIR_ATTR, name)
            config = with_values(self.base, {**params, "train.name": name, "train.out": str(self.study_dir)})
            for_comparison(config)  # one precision for every trial
            validate(config)
            result = train(config, callbacks=[pruning])
        except (TrainingInterrupted, KeyboardInterrupt) as exc:  # a signal (see charlm.tools.tune.study)
            trial.set_user_attr(STOPPED_ATTR, (str(exc) or "interrupted").splitlines()[0])
            raise
        except SystemExit:  # Lightning 2.6's answer to a KeyboardInterrupt in fit before StopOnInterrupt has the
            # signals (exit(1)); Optuna would leave the trial RUNNING: make it the interruption it was
            trial.set_user_attr(STOPPED_ATTR, "interrupted while its run started")
            raise KeyboardInterrupt("interrupted while its run started") from None
        except CharlmError as exc:
            trial.set_user_attr(ERROR_ATTR, str(exc))
            raise TrialFailed(str(exc)) from None
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("seconds", round(result.seconds, 1))
        if pruning.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        return result.best_val_loss

