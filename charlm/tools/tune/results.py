"""What ``charlm tune`` leaves: a line per finished trial, the table of trials, the best config as a YAML that
``charlm train --config`` takes, and Optuna's parameter-importance plot."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm.config import Config
from charlm.tools.tune.objective import ERROR_ATTR, STOPPED_ATTR, counts
from charlm.tools.tune.space import with_values
from charlm.util.atomic import atomic_write_text

BEST_FILE, IMPORTANCE_FILE = "best.yaml", "importance.png"


@dataclass
class StudyReport:
    best: FrozenTrial | None
    best_yaml: Path | None
    plot: Path | None
    plot_note: str | None  # why there is no plot
    finished: int  # COMPLETE + PRUNED + failed in training


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def outcome(trial: FrozenTrial) -> str:
    """``complete, val loss 1.2345`` / ``pruned at step 40`` / ``failed: <why>`` / ``interrupted``."""
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        return f"complete, val loss {trial.value:.4f}"
    if trial.state == TrialState.PRUNED:
        steps = trial.intermediate_values
        return f"pruned at step {max(steps)}" if steps else "pruned"
    if trial.state == TrialState.FAIL:
        if ERROR_ATTR in trial.user_attrs:
            return f"failed: {trial.user_attrs[ERROR_ATTR]}"
        return f"interrupted ({trial.user_attrs.get(STOPPED_ATTR, 'no reason recorded')})"
    return trial.state.name.lower()


def print_trial_end(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's callback after each trial of this worker: one line."""
    Console(highlight=False).print(f"[bold]trial {trial.number}[/] {escape(outcome(trial))}  "
                                   f"{escape(_params_text(trial.params))}", soft_wrap=True)


def trials_table(study: optuna.Study) -> Table:
    trials = study.get_trials(deepcopy=False)
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    best = _best(study)
    table = Table(title=f"charlm tune: study {escape(study.study_name)}")
    for name in ("trial", "state", "val loss", "steps", *keys):
        table.add_column(escape(name), justify="right" if name in ("trial", "val loss", "steps") else "left")
    for t in trials:
        state = t.state.name + (" (error)" if t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs else "")
        loss = f"{t.value:.4f}" if t.value is not None else "-"
        if t.state == TrialState.PRUNED and t.intermediate_values:
            loss = f"({t.intermediate_values[max(t.intermediate_values)]:.4f})"  # its last validation
        cells = [str(t.number), state, loss, str(t.user_attrs.get("steps", "-")),
                 *(_value_text(t.params.get(k, "-")) for k in keys)]
        table.add_row(*(escape(c) for c in cells), style="bold green" if best and t.number == best.number else None)
    return table


def _value_text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _best(study: optuna.Study) -> FrozenTrial | None:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def write_best_config(study: optuna.Study, user_config: Config, study_dir: Path) -> tuple[FrozenTrial, Path] | None:
    """``best.yaml``: the config the command was given with the best trial's values in place."""
    best = _best(study)
    if best is None:
        return None
    config = with_values(user_config, dict(best.params))
    header = (f"# charlm tune, study {study.study_name}: trial {best.number}, val loss {best.value:.4f} "
              f"(run folder {best.user_attrs.get('run_dir', '?')}).\n"
              "# Train it with `charlm train --config best.yaml` (--max-time / --max-steps for a longer run).\n")
    path = study_dir / BEST_FILE
    atomic_write_text(path, header + yaml.safe_dump(config.to_dict(), sort_keys=False))
    return best, path


def plot_importances(study: optuna.Study, study_dir: Path) -> tuple[Path | None, str | None]:
    """``importance.png`` (Optuna's plot, PED-ANOVA: Optuna's own evaluator, no scikit-learn), or why not."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return None, f"no importance plot: it needs at least 2 completed trials, the study has {len(complete)}"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, 'no importance plot: it needs matplotlib (pip install "charlm[plot]")'
    from optuna.importance import PedAnovaImportanceEvaluator
    from optuna.visualization.matplotlib import plot_param_importances

    try:
        with warnings.catch_warnings():  # the plot is "experimental" (Optuna 5.1)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. every trial drew the same values
        return None, f"no importance plot: {' '.join(str(exc).split())}"
    path = study_dir / IMPORTANCE_FILE
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)
    return path, None


def report_study(study: optuna.Study, user_config: Config, study_dir: Path, console: Console | None) -> StudyReport:
    """The table (printed), ``best.yaml`` and ``importance.png``, from the study as the storage holds it now."""

    written = write_best_config(study, user_config, study_dir)
    plot, note = plot_importances(study, study_dir)
    finished = sum(counts(t) and t.state not in (TrialState.RUNNING, TrialState.WAITING)
                   for t in study.get_trials(deepcopy=False))
    if console is not None:
        console.print(trials_table(study))
        if note:
            console.print(f"[yellow]note:[/] {escape(note)}")
    best, path = written if written else (None, None)
    return StudyReport(best, path, plot, note, finished)
