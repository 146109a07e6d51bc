"""The loggers of a run (``train.loggers``, ``--logger``): charlm's ``metrics.csv`` and Lightning's TensorBoard.

Every value the module logs (``train_loss``, ``train_bpc``, ``lr``, ``grad_norm``, ``train_chars_per_s``,
``val_loss``, ``val_bpc``, ...) goes to each logger under the same name and step. ``csv`` is
:class:`charlm.training.metrics_csv.MetricsCSV` (``<run>/metrics.csv``); ``tensorboard`` is Lightning's own
``TensorBoardLogger`` writing event files to ``<run>/tensorboard/`` (needs the ``tensorboard`` package:
``pip install "charlm[tensorboard]"``), where :func:`log_text` also puts the sample printed at each
validation. A resumed run writes to the same TensorBoard folder; events of the steps it logs again
(those after its checkpoint) are purged, as ``metrics.csv`` drops those rows.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from charlm.config import Config, logger_names
from charlm.training.metrics_csv import MetricsCSV
from charlm.util.errors import CharlmError

TENSORBOARD_DIR = "tensorboard"  # <run>/tensorboard/: the run's event files
TENSORBOARD_MISSING = ('--logger tensorboard (train.loggers) needs the tensorboard package, which is not installed: '
                       'pip install "charlm[tensorboard]"')


def require_tensorboard() -> None:
    """Raise one clear sentence unless the ``tensorboard`` package can be imported."""
    try:
        importlib.import_module("tensorboard")
    except ImportError:
        raise CharlmError(TENSORBOARD_MISSING) from None


def check_loggers(config: Config) -> None:
    """Raise one clear sentence if a logger ``train.loggers`` names cannot run here (before anything is made)."""
    if "tensorboard" in logger_names(config.train.loggers):
        require_tensorboard()


def build_loggers(config: Config, run_dir: Path, *, resumed_at_step: int | None = None) -> list[Logger]:
    """The loggers ``train.loggers`` names, writing under ``run_dir`` (``metrics.csv`` first, when asked).

    ``resumed_at_step``: the global step of the checkpoint a resumed run continues from; both loggers then
    continue the run's files, and what the interrupted session logged from that step on is replaced.
    """
    loggers: list[Logger] = []
    for name in logger_names(config.train.loggers):
        if name == "csv":
            loggers.append(MetricsCSV(run_dir, resumed=resumed_at_step is not None))
        else:
            require_tensorboard()
            # purge_step (a SummaryWriter argument): TensorBoard hides the events at or after this step that
            # an earlier session wrote, since this session logs those steps again
            extra = {} if resumed_at_step is None else {"purge_step": resumed_at_step}
            loggers.append(TensorBoardLogger(save_dir=run_dir, name="", version=TENSORBOARD_DIR,
                                             default_hp_metric=False, **extra))
    return loggers


def log_text(trainer: L.Trainer, tag: str, text: str) -> None:
    """Add ``text`` to every TensorBoard logger of ``trainer`` (global rank 0 only), at the step a validation's
    metrics are logged under: the last training step's (``global_step - 1``), so a resumed run, which purges
    the steps from its checkpoint's ``global_step`` on, keeps the text of that checkpoint's validation."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # TensorBoard renders text as Markdown: four spaces make it a code block, kept as generated
            logger.experiment.add_text(tag, "    " + text.replace("\n", "\n    "), max(trainer.global_step - 1, 0))
