"""What a hostile user tried (issue #30, 7 to 9): each gets one sentence and exit 2, or works, never a
traceback, a hang or an allocation of terabytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke, shakespeare_text, smoke_args

from charlm.cli import STDOUT_CLOSED
from charlm.config import load_config
from charlm.data.corpus import read_corpus
from charlm.data.vocab import Vocab
from charlm.model.char_lm import memory_bytes, parameter_count


# ----------------------------------------------------------------------------------------- 7: tracebacks
def test_a_run_name_and_a_corpus_outside_the_basic_multilingual_plane(tmp_path: Path) -> None:
    """An emoji in --name and in the --data path: --set carries them as JSON, whose escapes YAML would read
    as two lone surrogates each."""
    corpus = tmp_path / "c🎭.txt"
    corpus.write_text(shakespeare_text(), encoding="utf-8")
    code, output = invoke(*smoke_args(corpus, tmp_path / "runs", "x🎭"), "--max-steps", "2", "--no-samples")
    assert code == 0, output
    assert (tmp_path / "runs" / "x🎭" / "best.ckpt").is_file()
    assert load_config(str(tmp_path / "runs" / "x🎭" / "config.yaml")).data.path == str(corpus)


def test_a_run_name_no_file_system_can_hold(tmp_path: Path, corpus_file: Path) -> None:
    args = ["train", "--config", "smoke", "--data", str(corpus_file), "--out", str(tmp_path)]
    code, output = invoke(*args, "--set", 'train.name="x\\ud83c"')
    assert (code, output) == (2, "error: --name (train.name) 'x\\ud83c' holds characters this file system cannot "
                                 "name a folder with; choose another name")
    assert list(tmp_path.iterdir()) == []


def test_a_model_beyond_memory_is_refused_before_anything_is_allocated(tmp_path: Path, corpus_file: Path) -> None:
    memory = memory_bytes()
    assert memory is not None
    cfg = load_config("smoke", ["model.hidden_size=1000000"])
    count = parameter_count(len(Vocab.from_text(shakespeare_text())), cfg.model)
    assert count > 4e12  # 4 (d + h) h in the first LSTM layer alone: 16 terabytes
    code, output = invoke(*smoke_args(corpus_file, tmp_path), "--set", "model.hidden_size=1000000")
    assert (code, output) == (2, f"error: the model (cell lstm, 2 layer(s) of 1,000,000, embedding 32) has {count:,} "
                                 f"parameters, {count * 4 / 1e9:,.1f} GB for its weights alone, more than this "
                                 f"machine's {memory / 1e9:,.1f} GB of memory; make model.hidden_size, "
                                 "model.embedding_size or model.num_layers smaller")
    assert list(tmp_path.iterdir()) == []  # no run folder


@pytest.mark.parametrize("command", [["sample", "--length", "5"], ["cells"]], ids=["sample", "cells"])
def test_a_closed_stdout_is_one_sentence(trained_run: Path, command: list[str]) -> None:
    """``charlm sample >&-``: Python starts with no sys.stdout at all."""
    args = [sys.executable, "-m", "charlm", *command]
    if command[0] == "sample":
        args += ["--checkpoint", str(trained_run / "best.ckpt")]
    result = subprocess.run(["sh", "-c", '"$@" >&-', "sh", *args], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, f"error: {STDOUT_CLOSED}\n")


# ---------------------------------------------------------------------------------- 8: unbounded work
def test_a_prime_file_that_never_ends_is_refused_unread(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    assert invoke("sample", "--checkpoint", ckpt, "--prime-file", "/dev/zero") == (
        2, "error: --prime-file /dev/zero is a character device, not a text file; give the path of a UTF-8 text file")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it would wait for a writer forever
    assert invoke("sample", "--checkpoint", ckpt, "--prime-file", str(fifo)) == (
        2, f"error: --prime-file {fifo} is a pipe, not a text file; give the path of a UTF-8 text file")


def test_a_prime_is_at_most_100000_characters(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    long = tmp_path / "long.txt"
    long.write_text("a" * 100_001)
    assert invoke("sample", "--checkpoint", ckpt, "--prime-file", str(long)) == (
        2, f"error: --prime-file {long} is longer than 100,000 characters; give a shorter text")
    long.write_text("é" * 100_001)  # two bytes each
    assert invoke("sample", "--checkpoint", ckpt, "--prime-file", str(long))[1].endswith(
        "is longer than 100,000 characters; give a shorter text")
    assert invoke("sample", "--checkpoint", ckpt, "--prime", "a" * 100_001) == (
        2, "error: --prime is longer than 100,000 characters (100,001); give a shorter text")
    edge = tmp_path / "edge.txt"
    edge.write_text("\ufeff" + "e" * 100_000)  # the byte order mark is not part of the text
    assert invoke("sample", "--checkpoint", ckpt, "--prime-file", str(edge), "--length", "3")[0] == 0


def test_the_layer_count_is_bounded(tmp_path: Path, corpus_file: Path) -> None:
    assert invoke(*smoke_args(corpus_file, tmp_path), "--set", "model.num_layers=100000") == (
        2, "error: config key 'model.num_layers' must be at most 100 (a deeper stack takes minutes just to build), "
           "got 100,000")


# ------------------------------------------------------------------------------ 9: messages that mislead
@pytest.mark.parametrize("option", ["--checkpoint", "--resume"])
def test_a_checkpoint_that_is_a_folder_or_a_device_is_called_what_it_is(trained_run: Path, tmp_path: Path,
                                                                         option: str) -> None:
    command = ["eval"] if option == "--checkpoint" else ["train"]
    # a model folder (charlm export --format safetensors) is read by --checkpoint, never resumed
    folder_too = ", or a folder written by `charlm export --format safetensors`" if option == "--checkpoint" else ""
    assert invoke(*command, option, str(trained_run)) == (
        2, f"error: checkpoint {trained_run} is a folder, not a checkpoint file; give a .ckpt file, such as "
           f"{trained_run / 'best.ckpt'}{folder_too}")
    assert invoke(*command, option, str(tmp_path)) == (
        2, f"error: checkpoint {tmp_path} is a folder, not a checkpoint file; give a .ckpt file{folder_too}")
    for device in ("/dev/null", "/dev/zero"):
        assert invoke(*command, option, device) == (
            2, f"error: checkpoint {device} is a character device, not a checkpoint file; give a .ckpt file")
    assert invoke(*command, option, str(tmp_path / "none.ckpt")) == (
        2, f"error: checkpoint {tmp_path / 'none.ckpt'} does not exist")


def test_an_empty_checkpoint_path_is_not_the_newest_run(tmp_path: Path) -> None:
    for command in (["eval", "--checkpoint"], ["sample", "--checkpoint"], ["viz", "--checkpoint"], ["export"]):
        what = "--checkpoint" if len(command) == 2 else "the checkpoint argument"
        leave = "the option" if len(command) == 2 else "it"
        assert invoke(*command, "") == (
            2, f"error: {what} is empty; give a checkpoint file, or leave {leave} out to use the newest run's "
               "best.ckpt")
    assert invoke("train", "--resume", "", "--out", str(tmp_path)) == (
        2, "error: --resume is empty; give a checkpoint file, or --resume alone to continue the newest run")


def test_a_config_that_is_a_folder_or_a_device(tmp_path: Path, corpus_file: Path) -> None:
    known = "awd-lstm, default, smoke"
    for where, kind in ((tmp_path, "a folder"), (Path("/dev/null"), "a character device")):
        assert invoke("train", "--config", str(where), "--data", str(corpus_file), "--out", str(tmp_path)) == (
            2, f"error: config {where} is {kind}, not a YAML file; give a YAML file or one of: {known}")


def test_an_empty_text_file_is_called_a_text_file(trained_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    ckpt = str(trained_run / "best.ckpt")
    assert invoke("eval", "--checkpoint", ckpt, "--text", str(empty)) == (2, f"error: --text file {empty} is empty")
    assert invoke("viz", "--checkpoint", ckpt, "--text", str(empty)) == (2, f"error: --text file {empty} is empty")
    assert invoke("eval", "--checkpoint", ckpt, "--text", str(tmp_path / "none.txt")) == (
        2, f"error: --text file {tmp_path / 'none.txt'} does not exist; give --text an existing text file")


def test_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    """Stripped once, at the start, wherever a text file is read (corpus, --text, --prime-file)."""
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffROMEO:\n\ufeff".encode())
    corpus = read_corpus(path)
    assert corpus.text == "ROMEO:\n\ufeff" and corpus.sha256 == __import__("hashlib").sha256(
        path.read_bytes()).hexdigest()
    path.write_bytes(("\ufeff" + shakespeare_text()).encode())
    code, output = invoke("data", "--data", str(path), "--config", "smoke")
    assert code == 0 and "\ufeff" not in output and "\\ufeff" not in output
    assert f"vocabulary │ {len(Vocab.from_text(shakespeare_text()))}:" in output


def test_a_one_character_corpus_is_refused_by_charlm_data_as_by_train(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("a")
    message = (f"error: corpus {path} is too short: its training split has 1 characters, one batch needs "
               "batch_size * (bptt + 1) = 264; use a longer text or lower data.batch_size / data.bptt")
    assert invoke("data", "--data", str(path), "--config", "smoke") == (2, message)
    assert invoke(*smoke_args(path, tmp_path / "runs")) == (2, message)


def test_a_key_given_twice_is_refused(tmp_path: Path, corpus_file: Path) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text("model:\n  hidden_size: 64\n  dropout: 0.1\n  hidden_size: 128\n")
    assert invoke("train", "--config", str(config), "--data", str(corpus_file), "--out", str(tmp_path)) == (
        2, f"error: config file {config} gives 'model.hidden_size' twice (lines 2 and 4); a key given twice is a "
           "mistake: keep one")
    config.write_text("model:\n  hidden_size: 64\ntrain:\n  seed: 1\nmodel:\n  dropout: 0.2\n")
    assert invoke("train", "--config", str(config), "--data", str(corpus_file), "--out", str(tmp_path)) == (
        2, f"error: config file {config} gives 'model' twice (lines 1 and 5); a key given twice is a mistake: keep "
           "one")
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: loguniform(1e-4, 1e-2)\noptim.lr: uniform(0.1, 0.2)\n")
    assert invoke("tune", "--space", str(space), "--study", "s", "--trials", "1", "--data", str(corpus_file),
                  "--out", str(tmp_path)) == (
        2, f"error: search space {space} gives 'optim.lr' twice (lines 1 and 2); a key given twice is a mistake: "
           "keep one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml", "twice.yaml"]
