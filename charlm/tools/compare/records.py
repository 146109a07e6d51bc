"""Per-run records: ``<out>/<run>/compare-run.json`` (the run's settings and, once finished, its scores)
and the validation curve read back from the run's ``metrics.csv``.

The record is what makes a comparison resumable: a run with scores is skipped, one without is continued
from its ``last.ckpt`` (``charlm train --resume`` continues ``metrics.csv`` and the run's clock, so the
curve is read from that one file), and one whose settings differ from the command's is refused with
the keys that differ.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm.config import Config
from charlm.evaluation.metrics import LN2
from charlm.tools.compare.plan import PlannedRun
from charlm.training.metrics_csv import METRICS_FILE
from charlm.util.atomic import atomic_write_text
from charlm.util.errors import CharlmError

RUN_RECORD = "compare-run.json"
RECORD_VERSION = 2  # 2: curve times as logged (version 1 placed them in proportion to steps)
# The settings a run must share with its record to be skipped or resumed (the rest is display / device).
_CHECKED_TRAIN_KEYS = ("seed", "max_epochs", "max_steps", "max_time", "val_every_steps")


@dataclass
class RunResult:
    """One finished run, scored from its best checkpoint on the whole val and test splits."""

    cell: str
    name: str
    seed: int
    run_dir: str  # relative to the comparison folder
    hidden_size: int
    parameters: int
    val_loss: float
    val_bpc: float
    val_ppl: float
    test_loss: float
    test_bpc: float
    test_ppl: float
    train_seconds: float  # the run's training clock at its end, carried over resumes
    train_chars_per_s: float  # median of the logged per-step throughput
    best_step: int  # optimizer steps behind best.ckpt
    steps: int  # optimizer steps trained
    # step, seconds (training time logged at that validation, None where unknown), val_loss, val_bpc
    curve: list[dict[str, float | None]] = field(default_factory=list)
    vocab_size: int | None = None  # V, for the divergence rule (val_loss > ln V); None in records made before it

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "curve"}

    def diverged(self, vocab_size: int | None = None) -> bool:
        """Whether the run diverged: its best validation loss is not finite, or worse than a uniform guess over the
        V characters (ln V nats), V its own (``vocab_size``) or, for a record without one, the one given."""
        v = self.vocab_size or vocab_size
        return not math.isfinite(self.val_loss) or (v is not None and self.val_loss > math.log(v))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def fingerprint(config: Config) -> dict[str, Any]:
    """The settings that make two runs the same experiment."""
    d = config.to_dict()
    return {"data": d["data"], "model": d["model"], "optim": d["optim"],
            "train": {k: d["train"][k] for k in _CHECKED_TRAIN_KEYS}}


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs; a key the old record lacks (added to the config since) counts only off its default."""
    a, b = _flat(old), _flat(new)
    defaults = _flat(fingerprint(Config()))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def _read_record(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CharlmError(f"cannot read {path} ({exc}); delete that run's folder to retrain it") from None
    if not isinstance(values, dict):
        raise CharlmError(f"{path} is not a charlm compare record; delete that run's folder to retrain it")
    return values


def write_record(plan: PlannedRun, result: RunResult | None) -> None:
    """Save the run's record: its settings, and its scores once it is finished (``None`` before)."""
    record = {"version": RECORD_VERSION, "cell": plan.entry.cell, "name": plan.entry.name, "seed": plan.seed,
              "fingerprint": fingerprint(plan.config),
              "result": None if result is None else dataclasses.asdict(result)}
    plan.run_dir.mkdir(parents=True, exist_ok=True)  # the run's folder, under the comparison's
    atomic_write_text(plan.run_dir / RUN_RECORD, json.dumps(record, indent=1))


def finished_result(plan: PlannedRun) -> RunResult | None:
    """The recorded scores of a finished run, ``None`` if it still has to (re)train.

    A folder not made by compare, or one made with other settings, is refused with the differences.
    """
    record_path = plan.run_dir / RUN_RECORD
    if not record_path.is_file():
        if plan.run_dir.is_dir() and any(plan.run_dir.iterdir()):
            raise CharlmError(f"{plan.run_dir} exists but was not made by charlm compare (no {RUN_RECORD}); "
                              "choose another --out")
        return None
    record = _read_record(record_path)
    diff = _differences(record.get("fingerprint", {}), fingerprint(plan.config))
    if diff:
        raise CharlmError(f"{plan.run_dir} was trained with other settings ({'; '.join(diff)}); re-run with the "
                          "same options to resume, or choose another --out")
    if not record.get("result"):
        return None
    result = RunResult.from_dict(record["result"])
    if record.get("version", 1) < 2:  # its curve's times were placed in proportion to steps, not measured
        result.curve = [{**point, "seconds": None} for point in result.curve]
    return result


CurvePoint = tuple[int, float, float, float | None]  # step, val_loss, val_bpc, elapsed_s (None: not logged)


def read_curve(run_dir: Path) -> tuple[list[CurvePoint], list[float]]:
    """Validation points ``(step, val_loss, val_bpc, elapsed_s)`` and logged throughputs of the run's
    ``metrics.csv`` (one file over every resume: a resumed run continues it).

    The CSV's ``step`` is zero-based at logging time; ``step + 1`` is the number of optimizer steps done,
    which is also what a checkpoint's ``global_step`` counts. ``elapsed_s`` is the training time the run
    logged at that validation (continued over resumes), ``None`` where it logged none.
    """
    val: dict[int, tuple[float, float, float | None]] = {}
    speeds: list[float] = []
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return [], speeds
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                step = int(float(row["step"])) + 1
            except (KeyError, ValueError):
                continue
            if row.get("val_loss"):
                loss = float(row["val_loss"])
                val[step] = (loss, float(row["val_bpc"]) if row.get("val_bpc") else loss / LN2,
                             float(row["elapsed_s"]) if row.get("elapsed_s") else None)
            if row.get("train_chars_per_s"):
                speeds.append(float(row["train_chars_per_s"]))
    return [(s, *val[s]) for s in sorted(val)], speeds
