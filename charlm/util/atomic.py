"""Atomic file writes: a file is either its old self or completely new, whenever the process dies.

Every file charlm writes that matters after a crash (checkpoints, ``metrics.csv``, ``config.yaml``,
comparison results, figures, the downloaded corpus) goes through :func:`atomic_file`: the content goes
to a temporary file beside the target, is flushed and fsynced, gets the permissions a plain ``open()``
would give it, and is renamed over the target; the folder is fsynced so the rename itself survives a
power cut. An error on the way (a full disk, Ctrl-C) removes the temporary file and leaves the old
target untouched; the ``OSError`` itself is raised unchanged, so callers can explain it by ``errno``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; it is put back at once
    os.umask(mask)
    return mask


# read once, at import: os.umask is process-wide, and setting it while other threads create files races them
_UMASK = _read_umask()
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() gives a new file; mkstemp makes 0600
FOLDER_MODE = 0o777 & ~_UMASK  # what a plain mkdir() gives a new folder; mkdtemp makes 0700


@contextmanager
def atomic_file(path: str | Path, mode: Literal["wb", "w"] = "wb", *, encoding: str = "utf-8"
                ) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; when the block ends without an exception it
    replaces ``path`` (durably), otherwise it is removed and ``path`` is left as it was.

    ``mode`` ``"w"`` writes text (``encoding``, no newline translation), ``"wb"`` bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        text = mode == "w"
        with os.fdopen(fd, mode, **({"encoding": encoding, "newline": ""} if text else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes | bytearray | memoryview) -> None:
    """Replace ``path`` with ``data``, atomically (see :func:`atomic_file`)."""
    with atomic_file(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``text``, atomically (see :func:`atomic_file`); no newline translation."""
    with atomic_file(path, "w", encoding=encoding) as fh:
        fh.write(text)


def rename_into_place(source: str | Path, target: str | Path) -> None:
    """Move a finished file or folder ``source`` onto ``target`` in one rename (same file system), so a
    reader sees the old one or the new one, never a mix; durable once the target's folder is synced."""
    os.replace(source, target)
    fsync_folder(Path(target).parent)


def fsync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
