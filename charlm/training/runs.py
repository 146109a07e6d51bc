"""The run folder ``<out>/<name>``: its name, its creation, and the lock held while a run writes to it.

One run, one folder: a new run never reuses a folder that holds a run's work (``--resume`` continues one),
every process of a DDP run agrees on the folder's name, and only one ``charlm train`` at a time writes
to a folder (an OS lock on ``<run>/.lock``, held from the first file written until training ends).
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from charlm.config import Config
from charlm.util.atomic import leftover_temporaries
from charlm.util.errors import CharlmError

# Lightning's DDP launcher starts the other processes by running the same command again; a run without
# --name passes the name its first process chose to them through the environment.
RUN_NAME_ENV = "CHARLM_RUN_NAME"
LOCK_FILE = ".lock"
# what a run that failed before its first step leaves: a new run may take such a folder over
NO_WORK = frozenset({LOCK_FILE, "config.yaml"})
# the files written into a run folder through charlm.util.atomic (whose temporary files a kill may leave)
WRITTEN_HERE = ("last.ckpt", "best.ckpt", "metrics.csv", "config.yaml", "compare-run.json")


def check_run_name(name: str) -> str:
    """``name`` itself if it is a plain folder name, else one clear error."""
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise CharlmError(f"--name (train.name) must be a plain folder name under --out: not empty, not '.' or "
                          f"'..', without '/' or '\\'; got {name!r}")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise CharlmError(f"--name (train.name) {name!r} holds characters this file system cannot name a folder "
                          "with; choose another name") from None
    return name


def new_run_dir(config: Config) -> Path:
    """``<out>/<name>`` of a new run: ``train.name``, else ``<cell>-<date>-<time>`` (``-2``, ``-3``, ... when a
    run started in the same second); a process started by the DDP launcher gets its first process's."""
    out, name = Path(config.train.out), config.train.name
    if name is not None:
        return out / check_run_name(name)
    inherited = os.environ.get(RUN_NAME_ENV)
    if inherited:
        return out / check_run_name(inherited)
    base = f"{config.model.cell}-{dt.datetime.now():%Y%m%d-%H%M%S}"
    name, n = base, 1
    while (out / name).exists():
        n += 1
        name = f"{base}-{n}"
    return out / name


def _not_writable(path: Path, exc: OSError) -> CharlmError:
    return CharlmError(f"output folder {path} is not writable ({exc.strerror or exc}); choose another with --out")


def _holds_work(run_dir: Path) -> bool:
    return any(p.name not in NO_WORK for p in run_dir.iterdir())


def _exists_message(run_dir: Path) -> str:
    return (f"run folder {run_dir} already exists; choose another --name, or continue that run with "
            f"`charlm train --resume {run_dir / 'last.ckpt'}`")


def _create(run_dir: Path, *, new: bool) -> None:
    """Create the folder (a new run: unless it exists without any work in it) and prove it is writable."""
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            run_dir.mkdir()
        except FileExistsError:
            if not run_dir.is_dir() or (new and _holds_work(run_dir)):
                raise CharlmError(_exists_message(run_dir)) from None
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise _not_writable(run_dir, exc) from None


@contextmanager
def hold_run_folder(run_dir: Path, *, new: bool, writer: bool = True) -> Iterator[Path]:
    """Hold ``run_dir`` for a run: created (``new``: refused if it holds a run's work), locked until the block
    ends, its name passed to processes started meanwhile (see :data:`RUN_NAME_ENV`).

    Only the ``writer`` (the first DDP process) creates and locks; the others write nothing there.
    """
    lock: FileLock | None = None
    if writer:
        _create(run_dir, new=new)
        lock = FileLock(run_dir / LOCK_FILE, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise CharlmError(f"run folder {run_dir} is in use by another charlm train (it holds "
                              f"{run_dir / LOCK_FILE}); wait for that run to end, or choose another --name"
                              ) from None
        except OSError as exc:
            raise _not_writable(run_dir, exc) from None
        if new and _holds_work(run_dir):  # another run got there first
            lock.release()
            raise CharlmError(_exists_message(run_dir))
        for debris in leftover_temporaries(run_dir, WRITTEN_HERE):  # a kill mid-write; the lock: no writer now
            debris.unlink(missing_ok=True)
    previous = os.environ.get(RUN_NAME_ENV)
    os.environ[RUN_NAME_ENV] = run_dir.name
    try:
        yield run_dir
    finally:
        if previous is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = previous
        if lock is not None:
            lock.release()
