"""charlm.util.atomic: a file is its old self or completely new, whatever happens while it is written."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from charlm.training.checkpoint_io import atomic_torch_save
from charlm.util.atomic import FILE_MODE, atomic_file, atomic_write_bytes, atomic_write_text
from charlm.util.errors import CharlmError


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_writes_beside_the_target_fsyncs_then_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    seen: dict[str, Any] = {"fsynced": []}
    real_replace, real_fsync = os.replace, os.fsync

    def watching_replace(src: Any, dst: Any) -> None:
        seen["replace"] = (Path(src), Path(dst))
        seen["old_intact_before_rename"] = target.read_text() == "old\n"
        seen["temp_complete_before_rename"] = Path(src).read_bytes() == b"new\r\nrow\n"
        real_replace(src, dst)

    def watching_fsync(fd: int) -> None:
        seen["fsynced"].append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", watching_replace)
    monkeypatch.setattr(os, "fsync", watching_fsync)
    with atomic_file(target, "w") as fh:
        fh.write("new\r\nrow\n")  # text as given: no newline translation
        temps = temp_files(tmp_path)
        assert len(temps) == 1 and temps[0].name.startswith(".metrics.csv.")
    assert seen["replace"] == (temps[0], target)
    assert seen["old_intact_before_rename"] and seen["temp_complete_before_rename"]
    if Path("/proc/self/fd").is_dir():  # the file's data, then the folder's entry
        assert seen["fsynced"] == [str(temps[0]), str(tmp_path)]
    assert target.read_bytes() == b"new\r\nrow\n"
    assert temp_files(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~umask


@pytest.mark.parametrize("death", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["interrupted", "disk-full"])
def test_a_write_that_dies_half_way_leaves_the_old_file(tmp_path: Path, death: BaseException) -> None:
    target = tmp_path / "last.ckpt"
    atomic_write_bytes(target, b"old checkpoint")
    with pytest.raises(type(death)), atomic_file(target) as fh:
        fh.write(b"half a checkpoint")
        raise death
    assert target.read_bytes() == b"old checkpoint"
    assert temp_files(tmp_path) == []


def test_text_into_a_folder_that_exists_only(tmp_path: Path) -> None:
    """No folder is made on the way (the caller makes the folders it owns): see test_outputs.py."""
    atomic_write_text(tmp_path / "config.yaml", "model:\n  cell: lstm\n")
    assert (tmp_path / "config.yaml").read_text() == "model:\n  cell: lstm\n"
    with pytest.raises(CharlmError, match=r"the folder .*new does not exist"):
        atomic_write_text(tmp_path / "new" / "config.yaml", "x")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_torch_save_is_the_os_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's zip writer, writing to a full disk itself, fails with "unexpected pos"; a checkpoint is
    serialised in memory first, so the write's own ENOSPC is what comes out, and the old file stays."""
    import tempfile

    target = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    old = target.read_bytes()
    real_mkstemp = tempfile.mkstemp

    def full_disk_mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name  # every write: ENOSPC, as on a full disk

    monkeypatch.setattr(tempfile, "mkstemp", full_disk_mkstemp)
    with pytest.raises(OSError) as caught:
        atomic_torch_save({"w": torch.zeros(100_000)}, target)
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == old
    assert temp_files(tmp_path) == []
