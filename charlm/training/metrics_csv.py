"""``<run>/metrics.csv``: every logged value of a run, one row per logging call, kept across resumes."""

from __future__ import annotations

import csv
import io
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from charlm.util.atomic import atomic_write_text

METRICS_FILE = "metrics.csv"


class MetricsCSV(Logger):
    """A Lightning logger (public ``Logger`` API only) that writes ``<run>/metrics.csv``.

    The whole history is held in memory and the file is replaced atomically on each ``save`` (Lightning
    saves after every logging call; :class:`charlm.training.callbacks.LastCheckpoint` after every checkpoint),
    so a kill at any moment leaves the previous complete file, never a torn or emptied one. Columns are
    the sorted union of the logged names (Lightning's CSV layout); a value a row lacks is blank.

    With ``resumed`` set (a run continued from a checkpoint) the existing file is read back and continued:
    its rows from the first step this session logs onward are dropped, since they are logged again now.
    Only the first process writes under DDP.
    """

    def __init__(self, run_dir: str | Path, *, resumed: bool = False) -> None:
        super().__init__()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.resumed = resumed
        self._rows: list[dict[str, Any]] | None = None  # read (or started) at the first logging call
        self._trim_from_next_step = False
        self._unsaved = False

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def root_dir(self) -> str:
        return str(self.run_dir)

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @property
    def save_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """Nothing to do: the run's settings are in ``config.yaml`` and in every checkpoint."""

    def _history(self) -> list[dict[str, Any]]:
        if self._rows is None:
            self._rows = []
            if self.resumed and self.path.is_file():
                with self.path.open(newline="", encoding="utf-8") as fh:
                    self._rows = list(csv.DictReader(fh))
                self._trim_from_next_step = True
        return self._rows

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        rows = self._history()
        if step is None:
            step = len(rows)
        if self._trim_from_next_step:  # the first row of a resumed session: older rows from here on go
            self._trim_from_next_step = False
            rows[:] = [r for r in rows if not r.get("step") or float(r["step"]) < step]
        rows.append({**metrics, "step": step})
        self._unsaved = True

    @rank_zero_only
    def save(self) -> None:
        if not self._unsaved or self._rows is None:
            return
        columns = sorted({key for row in self._rows for key in row})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(self.path, buffer.getvalue())
        self._unsaved = False

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
