"""Output paths (issue #30, 6): a file charlm writes replaces a regular file atomically, is written through to
a character device or a pipe (as ``cp`` does), and is refused, before any work, where the path is a folder, a
block device or a socket or its folder is missing; an ``--out`` folder that is something else is refused.

The character devices are made in the test's own folder (``mknod``, as root) with the numbers of
``/dev/null`` and ``/dev/full``: the machine's own are never written."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import invoke, shakespeare_text, smoke_args

from charlm.util.atomic import atomic_write_text, check_output_file, check_output_folder, path_kind
from charlm.util.errors import CharlmError


def char_device(folder: Path, name: str, minor: int) -> Path:
    """A character device node of the memory driver (major 1): minor 3 is /dev/null's, 7 /dev/full's."""
    path = folder / name
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


@pytest.fixture
def null_device(tmp_path: Path) -> Path:
    return char_device(tmp_path, "null", 3)


@pytest.fixture
def full_device(tmp_path: Path) -> Path:
    return char_device(tmp_path, "full", 7)


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
        yield path


def is_char_device(path: Path) -> bool:
    return stat.S_ISCHR(os.stat(path).st_mode)


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path.parent / f"{tmp_path.name}-text.txt"  # beside the test's folder, whose listing is checked
    path.write_text(shakespeare_text(400), encoding="utf-8")
    return path


def per_char(checkpoint: Path, text: Path, target: Path, *extra: str) -> tuple[int, str]:
    return invoke("eval", "--checkpoint", str(checkpoint), "--text", str(text), "--per-char", str(target), *extra)


# ------------------------------------------------------------------------------------------ --per-char
def test_per_char_to_a_null_device_writes_through_and_leaves_it_a_device(sharp_checkpoint: Path, text_file: Path,
                                                                          null_device: Path) -> None:
    assert per_char(sharp_checkpoint, text_file, null_device, "--json")[0] == 0
    assert is_char_device(null_device) and sorted(p.name for p in null_device.parent.iterdir()) == ["null"]


def test_per_char_to_a_full_device_is_one_sentence_and_leaves_it_a_device(sharp_checkpoint: Path, text_file: Path,
                                                                          full_device: Path) -> None:
    code, output = per_char(sharp_checkpoint, text_file, full_device)
    assert (code, output) == (2, f"error: could not read or write {full_device}: No space left on device")
    assert is_char_device(full_device) and sorted(p.name for p in full_device.parent.iterdir()) == ["full"]


def test_per_char_into_a_pipe_reaches_the_reader(sharp_checkpoint: Path, text_file: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _ = per_char(sharp_checkpoint, text_file, fifo, "--json")
    reader.join(timeout=60)
    assert code == 0 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    lines = received[0].decode().splitlines()
    assert lines[0] == "position,char,nll" and len(lines) == 400  # the header and 399 scored characters


@pytest.mark.parametrize("case", ["folder", "missing-folder", "file-as-folder", "socket"])
def test_per_char_paths_refused_before_any_work(tmp_path: Path, case: str, unix_socket: Path) -> None:
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("keep me")
    target, message = {
        "folder": (tmp_path, f"--per-char {tmp_path} is a folder; give the path of a file to write"),
        "missing-folder": (tmp_path / "nonexist" / "x.csv",
                           f"--per-char {tmp_path / 'nonexist' / 'x.csv'}: the folder {tmp_path / 'nonexist'} does "
                           "not exist; create it first, or give another path"),
        "file-as-folder": (blocker / "x.csv", f"--per-char {blocker / 'x.csv'}: {blocker} is a regular file, not a "
                                              "folder; give another path"),
        "socket": (unix_socket, f"--per-char {unix_socket} is a socket, which charlm does not write to; give the "
                                "path of a regular file (a character device or a pipe is written through)"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    # a checkpoint that does not exist: the path is refused before the checkpoint is even looked at
    assert invoke("eval", "--checkpoint", str(tmp_path / "none.ckpt"), "--per-char", str(target)) == (
        2, f"error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and blocker.read_text() == "keep me"


# ---------------------------------------------------------------------------------- the other outputs
def test_viz_out(sharp_checkpoint: Path, text_file: Path, tmp_path: Path, null_device: Path) -> None:
    ckpt, text = str(sharp_checkpoint), text_file
    assert invoke("viz", "--checkpoint", ckpt, "--text", str(text), "--out", str(null_device))[0] == 0
    assert is_char_device(null_device)
    assert invoke("viz", "--checkpoint", ckpt, "--text", str(text), "--out", str(tmp_path)) == (
        2, f"error: --out {tmp_path} is a folder; give the path of a file to write")
    assert invoke("viz", "--checkpoint", ckpt, "--out", str(tmp_path / "no" / "v.html")) == (
        2, f"error: --out {tmp_path / 'no' / 'v.html'}: the folder {tmp_path / 'no'} does not exist; create it "
           "first, or give another path")
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("command", ["export", "gradients", "compare", "tune", "train"])
def test_an_out_folder_that_is_a_device_or_a_file_is_refused(command: str, sharp_checkpoint: Path, corpus_file: Path,
                                                            tmp_path: Path, null_device: Path) -> None:
    args = {"export": ["export", str(sharp_checkpoint)],
            "gradients": ["gradients", "--config", "smoke", "--data", str(corpus_file)],
            "compare": ["compare", "--cells", "lstm", "--config", "smoke", "--data", str(corpus_file)],
            "tune": ["tune", "--space", str(tmp_path / "space.yaml"), "--study", "s", "--trials", "2", "--data",
                     str(corpus_file)],
            "train": smoke_args(corpus_file, tmp_path)[:-4]}[command]
    (tmp_path / "space.yaml").write_text("optim.lr: loguniform(0.001, 0.01)\n")
    assert invoke(*args, "--out", str(null_device)) == (
        2, f"error: --out {null_device} is a character device, not a folder; give a folder to write into")
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("keep me")
    assert invoke(*args, "--out", str(blocker / "sub")) == (
        2, f"error: --out {blocker / 'sub'} cannot be made: {blocker} is a regular file, not a folder; give another "
           "folder")
    assert is_char_device(null_device) and blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker.txt", "null", "space.yaml"]


# ------------------------------------------------------------------------------------- the writer itself
def test_the_writer_refuses_what_it_must_not_replace(tmp_path: Path, unix_socket: Path) -> None:
    """Also without the commands' checks: a folder or a socket is never renamed over, a missing folder never
    made, and no temporary file is left."""
    (tmp_path / "dir").mkdir()
    for target, message in ((tmp_path / "dir", f"cannot write {tmp_path / 'dir'}: it is a folder; give the path of "
                                               "a regular file"),
                            (unix_socket, f"cannot write {unix_socket}: it is a socket; give the path of a regular "
                                          "file"),
                            (tmp_path / "no" / "x", f"cannot write {tmp_path / 'no' / 'x'}: the folder "
                                                    f"{tmp_path / 'no'} does not exist")):
        with pytest.raises(CharlmError) as caught:
            atomic_write_text(target, "x")
        assert str(caught.value) == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "sock"]
    assert path_kind(tmp_path / "dir") == "a folder" and path_kind(unix_socket) == "a socket"
    assert path_kind(tmp_path / "no") is None and path_kind(tmp_path / "dir" / "x" / "y") is None


def test_the_writer_writes_through_a_device(null_device: Path, full_device: Path) -> None:
    atomic_write_text(null_device, "x" * 10_000)
    with pytest.raises(OSError) as caught:
        atomic_write_text(full_device, "x" * 10_000)
    assert caught.value.filename == str(full_device) and caught.value.strerror == "No space left on device"
    assert is_char_device(null_device) and is_char_device(full_device)
    assert sorted(p.name for p in null_device.parent.iterdir()) == ["full", "null"]


def test_the_checks_accept_what_can_be_written(tmp_path: Path, null_device: Path) -> None:
    (tmp_path / "old.csv").write_text("old")
    assert check_output_file(tmp_path / "old.csv", "--x") == tmp_path / "old.csv"
    assert check_output_file(tmp_path / "new.csv", "--x") == tmp_path / "new.csv"
    assert check_output_file(null_device, "--x") == null_device
    assert check_output_folder(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"  # made by the command
    assert check_output_folder(tmp_path, "--out") == tmp_path
    assert not (tmp_path / "a").exists()
