"""The study of ``charlm tune``: its storage, the worker processes that run its trials, and its resumption.

Every worker (a process of this machine, or of any machine running the same command against the same storage)
runs the same loop: under the study folder's lock, count the trials that are done or under way; stop at
``--trials``; else ask Optuna for the next trial, which releases the lock as soon as the trial exists, and
train it. So on one machine the study ends with exactly ``--trials`` finished trials. (Machines do not share
that lock: two of them starting a trial at the same moment can run one trial more each.)

A trial that counts: COMPLETE, PRUNED, one whose training failed (FAIL with an ``error`` attribute: a
non-finite loss, say: its parameters are bad, running them again would fail again), and those RUNNING or
WAITING. A trial that does not: one interrupted (a signal, a killed process): it is marked FAIL, its
partial run folder is kept, and a new trial takes its place. A trial left RUNNING by a process that died
without a word (SIGKILL, a crash) is marked FAIL by the next worker of the same machine that sees its
process gone, and on other machines by Optuna's heartbeat (:data:`GRACE_S` seconds after its last beat).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from charlm.config import Config
from charlm.tools.tune.objective import (
    HOST_ATTR,
    PID_ATTR,
    STOPPED_ATTR,
    Objective,
    TrialFailed,
    counts,
)
from charlm.tools.tune.results import print_trial_end
from charlm.tools.tune.signals import HeldSignals, die_with_parent, signals_raise
from charlm.tools.tune.space import SearchSpace, with_values
from charlm.util.errors import CharlmError, TrainingInterrupted
from charlm.util.threads import max_threads, on_main_thread

HEARTBEAT_S, GRACE_S = 30, 120  # a RUNNING trial without a heartbeat for GRACE_S seconds is stale
POLL_S = 1.0  # how often the report looks again at trials still running elsewhere
SETTINGS_ATTR = "charlm"  # the study's user attribute holding what its trials must share
LOCK_FILE = ".tune.lock"
PRUNERS = "median, hyperband, threshold:LOSS (prune a trial once a validation loss is above LOSS) or none"


class TuneInterrupted(TrainingInterrupted):
    """The study stopped on a signal; the message says how far it got and how to continue."""


@dataclass(frozen=True)
class TuneSettings:
    """What every worker needs (sent to the worker processes, so plain data)."""

    study: str
    storage: str  # an Optuna storage URL
    study_dir: Path
    trials: int
    workers: int
    pruner: str
    objective: Objective
    fingerprint: dict[str, Any]  # what every machine joining the study must share (checked on joining)


def check_study_name(name: str) -> str:
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise CharlmError(f"--study must be a plain name (it names the study and its folder under --out), got {name!r}")
    return name


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


# Opening a new storage makes its tables; processes that open it together (machines joining one study, a
# reader) race to make them, and the losers' inserts fail: they try again, and find the tables made.
STORAGE_TRIES = 5


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Optuna's database storage at ``url`` (SQLite waits up to a minute for another process's write)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import IntegrityError, OperationalError

    try:
        shown = make_url(url).render_as_string(hide_password=True)
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        for attempt in range(STORAGE_TRIES):
            try:
                with warnings.catch_warnings():  # the heartbeat is "experimental" (Optuna 5.1)
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                      grace_period=GRACE_S)
            except (IntegrityError, OperationalError):
                if attempt + 1 == STORAGE_TRIES:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")
    except Exception as exc:  # a bad URL, a missing database driver, a server that does not answer
        shown = locals().get("shown", "(not a database URL)")
        raise CharlmError(f"could not open the study storage {shown}: {' '.join(str(exc).split())[:300]}") from None


def make_pruner(spec: str) -> optuna.pruners.BasePruner:
    name, _, arg = spec.strip().lower().partition(":")
    if name == "median" and not arg:
        return optuna.pruners.MedianPruner()
    if name == "hyperband" and not arg:
        return optuna.pruners.HyperbandPruner()
    if name == "none" and not arg:
        return optuna.pruners.NopPruner()
    if name == "threshold":
        with contextlib.suppress(ValueError):
            return optuna.pruners.ThresholdPruner(upper=float(arg))
    raise CharlmError(f"unknown --pruner {spec!r}; use {PRUNERS}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_orphans(study: optuna.Study, storage: optuna.storages.BaseStorage, *, unowned: bool = False) -> list[int]:
    """Mark FAIL the RUNNING trials of this machine whose process is gone; return their numbers.

    ``storage`` is the study's (Optuna reads unfinished trials from it again, so the study sees the change).
    ``unowned``: also those that never said whose they are (a process killed between Optuna creating the trial
    and the objective's first line). Only true when every worker of the study holds the study folder's lock
    (the SQLite file in it): the lock is held from before a trial is created until it has its owner.
    """
    study_id = storage.get_study_id_from_name(study.study_name)
    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(PID_ATTR)
        if isinstance(pid, int):
            if trial.user_attrs.get(HOST_ATTR) != host or _alive(pid):
                continue
            why = f"its process ({pid}) ended without finishing it"
        elif unowned:
            why = "its process ended before it started"
        else:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # another worker was first
            storage.set_trial_user_attr(trial_id, STOPPED_ATTR, why)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            failed.append(trial.number)
    return failed


def prepare_study(settings: TuneSettings) -> optuna.Study:
    """Create the study, or join it (refused if it was started with another space, config or budget)."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # charlm prints its own line per trial
    if settings.storage == default_storage(settings.study_dir):
        settings.study_dir.mkdir(parents=True, exist_ok=True)  # the SQLite file's folder
    storage = open_storage(settings.storage)  # a bad URL is refused before any folder is made
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=storage, study_name=settings.study,
                                direction="minimize", load_if_exists=True, pruner=make_pruner(settings.pruner))
    recorded = study.user_attrs.get(SETTINGS_ATTR)
    if recorded is None:
        if not study.trials and any(settings.study_dir.glob("trial-*")):
            raise CharlmError(f"{settings.study_dir} holds trial folders of another study (the storage has no "
                              f"trials of '{settings.study}'); choose another --study or --out")
        study.set_user_attr(SETTINGS_ATTR, settings.fingerprint)
    elif recorded != settings.fingerprint:
        changed = sorted(k for k in {**recorded, **settings.fingerprint}
                         if recorded.get(k) != settings.fingerprint.get(k))
        raise CharlmError(f"study '{settings.study}' was started with another {' and '.join(changed)}; run it with "
                          "the same --space, --config, --set and budget as before, or give a new --study")
    return study


def run_worker(settings: TuneSettings) -> None:
    """Run trials until the study has ``settings.trials`` that count; a signal raises :class:`TuneInterrupted`."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = open_storage(settings.storage)
    study = optuna.load_study(study_name=settings.study, storage=storage, pruner=make_pruner(settings.pruner))
    lock = FileLock(settings.study_dir / LOCK_FILE)
    with signals_raise() as received:
        try:
            while _next_trial(settings, study, storage, lock):
                pass
        except TrainingInterrupted as exc:
            raise TuneInterrupted(_stopped_message(settings, exc.exit_code), exc.exit_code) from None
        except KeyboardInterrupt:
            code = 128 + (received[0] if received else signal.SIGINT)
            raise TuneInterrupted(_stopped_message(settings, code), code) from None


def _next_trial(settings: TuneSettings, study: optuna.Study, storage: optuna.storages.BaseStorage,
                lock: FileLock) -> bool:
    """Run the study's next trial here, unless it has all its trials (then ``False``)."""
    lock.acquire()
    held = HeldSignals()  # until the trial is ours (see started): a signal then fails it
    try:
        fail_orphans(study, storage, unowned=settings.storage == default_storage(settings.study_dir))
        if _counted(study) >= settings.trials:
            return False

        def started() -> None:
            lock.release()
            held.release()

        study.optimize(lambda trial: settings.objective(trial, started=started), n_trials=1, catch=(TrialFailed,),
                       callbacks=[print_trial_end])
        return True
    finally:
        if lock.is_locked:
            lock.release()
        held.release()


def _stopped_message(settings: TuneSettings, code: int) -> str:
    what = {130: "Ctrl-C", 143: "SIGTERM"}.get(code, f"signal {code - 128}")
    return (f"charlm tune interrupted by {what}; trials under way are marked FAIL and will be replaced; "
            f"run the same command to continue study '{settings.study}'")


def _worker_process(settings: TuneSettings) -> None:
    """A worker process: its exit code tells the command how it ended (the command prints the one line)."""
    os.setpgrp()  # Ctrl-C reaches the command alone, which stops the workers with one SIGTERM each
    die_with_parent()
    try:
        run_worker(settings)
    except TuneInterrupted as exc:
        sys.exit(exc.exit_code)
    except CharlmError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


def _counted(study: optuna.Study) -> int:
    return sum(counts(t) for t in study.get_trials(deepcopy=False))


def run_study(settings: TuneSettings, say: Callable[[str], None] | None = None) -> optuna.Study:
    """Run the study to ``settings.trials`` trials, in this process or in ``settings.workers`` processes, and
    return it once none is running anywhere: a trial another process still runs (a command killed just
    before left its worker going; another machine) counts, so the report waits for it (``say`` is told once)
    and, should it end without counting (interrupted), this command runs the trial that replaces it."""
    study = prepare_study(settings)
    while True:
        if settings.workers == 1:
            run_worker(settings)
        elif _counted(study) < settings.trials:  # else nothing to start processes for
            _run_processes(settings)
        wait_for_running(settings, study, say)
        if _counted(study) >= settings.trials:
            return study


def wait_for_running(settings: TuneSettings, study: optuna.Study, say: Callable[[str], None] | None) -> None:
    """Return once the study has no RUNNING trial: each poll marks FAIL the trials of this machine whose
    process is gone (:func:`fail_orphans`) and, through Optuna's heartbeat, those of other machines."""
    storage = open_storage(settings.storage)
    told = False
    while True:
        fail_orphans(study, storage, unowned=settings.storage == default_storage(settings.study_dir))
        with warnings.catch_warnings():  # "experimental" (Optuna 5.1)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if not running:
            return
        if say is not None and not told:
            trials = "trial" if len(running) == 1 else "trials"
            say(f"waiting for {len(running)} {trials} still running in other processes ({trials} "
                f"{', '.join(map(str, running))}) before the report")
            told = True
        time.sleep(POLL_S)


def _process_context() -> Any:
    """Never a fork of this process (its torch may have started OpenMP threads, which a fork cannot carry):
    a fork server that imports torch, Lightning and Optuna once, before any thread starts, then forks each
    worker; where there is none (Windows), a fresh interpreter per worker."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["charlm.training.fit", "charlm.tools.tune.study"])
    return context


def _run_processes(settings: TuneSettings) -> None:
    context = _process_context()
    procs = [context.Process(target=_worker_process, args=(settings,), name=f"charlm-tune-{i}")
             for i in range(settings.workers)]
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if on_main_thread() else {}
    try:
        for p in procs:
            if not received:
                p.start()
        for p in procs:
            if p.pid is not None:
                p.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    codes = [p.exitcode for p in procs if p.pid is not None]
    signalled = [c for c in codes if c in (130, 143)]
    if received or signalled:
        code = 128 + received[0] if received else signalled[0]
        raise TuneInterrupted(_stopped_message(settings, code), code)
    failed = [c for c in codes if c]
    if failed:
        raise CharlmError(f"{len(failed)} of {len(codes)} tune workers failed (exit codes "
                          f"{', '.join(str(c) for c in failed)}; messages above); run the same command to continue")


# keys a machine may set its own way when it joins a study (they do not change what a trial computes)
_MACHINE_KEYS = {"data": ("path",), "train": ("threads", "progress", "out", "name", "accelerator", "devices")}


def study_settings(base: Config, space: SearchSpace, *, study: str, out: Path, storage: str | None, trials: int,
                   workers: int, pruner: str) -> TuneSettings:
    """Check everything a study needs before anything starts, and gather it for the workers.

    ``base`` is the config each trial starts from; with several workers and ``train.threads`` left at 0, each
    gets an equal share of this machine's CPUs (torch's own choice would give every process all of them).
    """
    if trials < 1:
        raise CharlmError(f"--trials must be at least 1, got {trials}")
    if workers < 1:
        raise CharlmError(f"--workers must be at least 1, got {workers}")
    make_pruner(pruner)
    space.check(base)
    study_dir = out / check_study_name(study)
    if workers > 1 and base.train.threads == 0:
        base = with_values(base, {"train.threads": max(1, max_threads() // workers)})
    values = base.to_dict()
    budget = {k: values["train"].pop(k) for k in ("max_steps", "max_time", "max_epochs")}
    for section, keys in _MACHINE_KEYS.items():
        for key in keys:
            values[section].pop(key)
    fingerprint = {"search space": space.describe(), "budget": budget, "config": values}
    return TuneSettings(study, storage or default_storage(study_dir), study_dir, trials, workers, pruner,
                        Objective(base, space, study_dir), fingerprint)
