"""charlm.util.atomic: a file is its old self or completely new, whatever happens while it is written."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from charlm.training.checkpoint_io import atomic_torch_save
from charlm.util.atomic import (
    FILE_MODE,
    _read_umask,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    check_output_file,
    leftover_temporaries,
    path_kind,
    rename_into_place,
)
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


def test_reading_the_umask_leaves_it_as_it_was() -> None:
    """The umask is read by setting it and putting it back: the value read is the one in force, and it stays."""
    old = os.umask(0o027)
    try:
        assert _read_umask() == 0o027
        assert os.umask(0o027) == 0o027  # still in force after the read
    finally:
        os.umask(old)


def test_a_kind_of_file_no_test_names_is_not_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mode with none of the six POSIX types (a Solaris door, a BSD whiteout) is "not a file", and is refused."""
    target = tmp_path / "door"
    monkeypatch.setattr(os, "stat", lambda path: os.stat_result((0o644, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    assert path_kind(target) == "not a file"
    with pytest.raises(CharlmError, match=rf"^cannot write {target}: it is not a file; give the path of a regular "):
        atomic_write_text(target, "x")


def test_the_output_file_check_names_the_folder(tmp_path: Path) -> None:
    """A file's folder must be there, and be a folder; the path itself comes back when it is."""
    assert check_output_file(tmp_path / "new.csv", "--x") == tmp_path / "new.csv"
    missing = tmp_path / "no" / "new.csv"
    with pytest.raises(CharlmError) as caught:
        check_output_file(missing, "--out")
    assert str(caught.value) == (f"--out {missing}: the folder {tmp_path / 'no'} does not exist; create it first, "
                                 "or give another path")
    (tmp_path / "file").write_text("x")
    under_a_file = tmp_path / "file" / "new.csv"
    with pytest.raises(CharlmError) as caught:
        check_output_file(under_a_file, "--out")
    assert str(caught.value) == (f"--out {under_a_file}: {tmp_path / 'file'} is a regular file, not a folder; "
                                 "give another path")


def test_leftover_temporaries_are_those_of_the_files_named(tmp_path: Path) -> None:
    """Only ``.<name>.<8 characters>.tmp`` files of the names given count; not other files, not folders."""
    for name in (".last.ckpt.k3j_x9ab.tmp", ".metrics.csv.AB12cd34.tmp", ".other.txt.abcdefgh.tmp",
                 ".last.ckpt.short.tmp", "last.ckpt", "metrics.csv"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".last.ckpt.abcdefgh.tmp").mkdir()
    assert leftover_temporaries(tmp_path, ["last.ckpt", "metrics.csv"]) == [
        tmp_path / ".last.ckpt.k3j_x9ab.tmp", tmp_path / ".metrics.csv.AB12cd34.tmp"]
    assert leftover_temporaries(tmp_path, ["metrics.csv"]) == [tmp_path / ".metrics.csv.AB12cd34.tmp"]


def test_text_in_the_encoding_given(tmp_path: Path) -> None:
    """UTF-8 unless told otherwise; the encoding given is the one written."""
    atomic_write_text(tmp_path / "a.txt", "é")
    assert (tmp_path / "a.txt").read_bytes() == b"\xc3\xa9"
    atomic_write_text(tmp_path / "b.txt", "é", encoding="latin-1")
    assert (tmp_path / "b.txt").read_bytes() == b"\xe9"
    atomic_write_text(tmp_path / "c.txt", "é", encoding="utf-16-le")
    assert (tmp_path / "c.txt").read_bytes() == b"\xe9\x00"


def test_rename_into_place_replaces_then_syncs_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished folder or file takes the target's place in one rename, and the target's folder is fsynced."""
    synced: list[str] = []
    real_fsync = os.fsync

    def watching_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if Path("/proc/self/fd").is_dir() else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    (tmp_path / "out").mkdir()
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "model.onnx").write_bytes(b"new")
    (tmp_path / "out" / "model.onnx").write_bytes(b"old")
    rename_into_place(tmp_path / "staging" / "model.onnx", tmp_path / "out" / "model.onnx")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"new"
    assert not (tmp_path / "staging" / "model.onnx").exists()
    rename_into_place(str(tmp_path / "staging"), str(tmp_path / "site"))
    assert (tmp_path / "site").is_dir() and not (tmp_path / "staging").exists()
    if Path("/proc/self/fd").is_dir():
        assert synced == [str(tmp_path / "out"), str(tmp_path)]
    else:
        assert len(synced) == 2
