"""Atomic file writes: a file is either its old self or completely new, whenever the process dies.

Every file charlm writes that matters after a crash (checkpoints, ``metrics.csv``, ``config.yaml``,
comparison results, figures, the downloaded corpus) goes through :func:`atomic_file`: the content goes
to a temporary file beside the target, is flushed and fsynced, gets the permissions a plain ``open()``
would give it, and is renamed over the target; the folder is fsynced so the rename itself survives a
power cut. An error on the way (a full disk, Ctrl-C) removes the temporary file and leaves the old
target untouched; the ``OSError`` itself is raised unchanged, so callers can explain it by ``errno``.

Only what the caller names is written: no folder is created on the way (a command creates the folder
given to its ``--out`` itself), and a path that is not a regular file is never renamed over. A character
device or a pipe (``/dev/null``, ``/dev/stdout``, a shell's ``>(gzip > f.gz)``) has no old content to keep,
so it is written through, as ``cp`` writes to one; a folder, a block device or a socket is refused. The
commands check their output paths before any work (:func:`check_output_file`, :func:`check_output_folder`),
so a mistyped path costs a sentence, not a run.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

from charlm.util.errors import CharlmError


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
    kind = path_kind(path)
    text_options = {"encoding": encoding, "newline": ""} if mode == "w" else {}
    if kind in WRITTEN_THROUGH:
        with _written_through(path), open(path, mode, **text_options) as fh:
            yield fh
        return
    if kind not in (None, REGULAR):
        raise CharlmError(f"cannot write {path}: it is {kind}; give the path of a regular file")
    if not path.parent.is_dir():
        raise CharlmError(f"cannot write {path}: the folder {path.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, mode, **text_options) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


@contextmanager
def _written_through(path: Path) -> Iterator[None]:
    """An error writing to a device or pipe names it (a buffered write fails at close, with no file name)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from None  # (BrokenPipeError stays one)


REGULAR = "a regular file"
WRITTEN_THROUGH = ("a character device", "a pipe")
_KINDS = ((stat.S_ISREG, REGULAR), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISFIFO, "a pipe"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_kind(path: str | Path) -> str | None:
    """What is at ``path`` (links followed), in words: ``"a regular file"``, ``"a folder"``, ``"a character
    device"``, ``"a pipe"``, ``"a block device"``, ``"a socket"``; None where nothing is."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return next((word for test, word in _KINDS if test(mode)), "not a file")


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` as the output file of ``option``, or one sentence saying why charlm will not write it there:
    a folder, a block device or a socket at the path, or a parent folder that is not there (none is made
    for a file given by path). A regular file is replaced; a character device or a pipe written through."""
    path = Path(path).expanduser()
    kind = path_kind(path)
    if kind == "a folder":
        raise CharlmError(f"{option} {path} is a folder; give the path of a file to write")
    if kind not in (None, REGULAR, *WRITTEN_THROUGH):
        raise CharlmError(f"{option} {path} is {kind}, which charlm does not write to; give the path of a regular "
                          "file (a character device or a pipe is written through)")
    parent = path_kind(path.parent)
    if parent is None:
        raise CharlmError(f"{option} {path}: the folder {path.parent} does not exist; create it first, or give "
                          "another path")
    if parent != "a folder":
        raise CharlmError(f"{option} {path}: {path.parent} is {parent}, not a folder; give another path")
    return path


def check_output_folder(path: str | Path, option: str) -> Path:
    """``path`` as the output folder of ``option`` (made, with its parents, by the command when missing), or
    one sentence where it, or the nearest thing above it that exists, is not a folder."""
    path = Path(path).expanduser()
    kind = path_kind(path)
    if kind not in (None, "a folder"):
        raise CharlmError(f"{option} {path} is {kind}, not a folder; give a folder to write into")
    above = next((p for p in path.parents if path_kind(p) is not None), None)
    if kind is None and above is not None and path_kind(above) != "a folder":
        raise CharlmError(f"{option} {path} cannot be made: {above} is {path_kind(above)}, not a folder; give "
                          "another folder")
    return path


def leftover_temporaries(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """The temporary files :func:`atomic_file` left in ``folder`` for the files ``names`` when its process was
    killed while writing one (``.last.ckpt.k3j_x9ab.tmp``): garbage to remove once no writer can be at work."""
    alternatives = "|".join(re.escape(n) for n in names)
    pattern = re.compile(rf"\.({alternatives})\.[A-Za-z0-9_]{{8}}\.tmp")
    return sorted(p for p in Path(folder).iterdir() if pattern.fullmatch(p.name) and p.is_file())


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
