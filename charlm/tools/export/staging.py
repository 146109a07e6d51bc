"""Where an export's output goes: the checks on ``--out`` and the staging that keeps a failed export from leaving
anything behind. Every format goes through here.

A folder export (``onnx``, ``safetensors``) makes its files in a temporary folder beside ``--out`` and moves them in
only when all are complete: the whole folder in one rename where ``--out`` is missing or empty, else (``--force``)
each file by its own rename, leaving the folder's other files alone. A one-file export (``web``) is written beside
its target and renamed over it (:func:`charlm.util.atomic.atomic_write_text`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from charlm.util.atomic import FOLDER_MODE, check_output_file, check_output_folder, fsync_folder, rename_into_place
from charlm.util.errors import CharlmError


def listed(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_out_folder(out: Path, names: Sequence[str], force: bool) -> None:
    """Refuse an ``--out`` that is a file, or a folder that already holds files (unless ``force``), or that cannot
    be made (:func:`charlm.util.atomic.check_output_folder`)."""
    if out.is_file():
        raise CharlmError(f"--out {out} is a file, not a folder; give a folder for {listed(names)}")
    check_output_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CharlmError(f"--out {out} already holds files; choose a new or empty folder, or add --force to "
                          f"replace its {listed(names)}")


def check_out_file(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that is a folder, or a file that exists (unless ``force``), or a path charlm does not write
    to (:func:`charlm.util.atomic.check_output_file`: a socket, a missing parent folder)."""
    if out.is_dir():
        raise CharlmError(f"--out {out} is a folder; give the name of the file to write (e.g. {out / 'model.html'})")
    check_output_file(out, "--out")
    if out.exists() and not force:
        raise CharlmError(f"--out {out} already exists; choose another file name, or add --force to replace it")


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` (on the same file system, so it moves in by rename), removed at the end
    with whatever is still in it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_in(staging: Path, out: Path, names: Sequence[str]) -> None:
    """Put the finished files in place: the whole folder in one rename where ``out`` is missing or empty, else
    each of ``names`` by its own rename."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        os.chmod(staging, FOLDER_MODE)  # as a plain mkdir, not mkdtemp's 0700
        rename_into_place(staging, out)  # the caller's cleanup then finds nothing left to remove
    else:
        for name in names:
            rename_into_place(staging / name, out / name)
    fsync_folder(out)
