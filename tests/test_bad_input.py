"""Every bad input gets one clear message and a non-zero exit, never a traceback (through the CLI).

Also covered in test_cli.py: a missing corpus, a corpus shorter than one batch, an unknown cell, an
unknown config key, a prime or ``--text`` file with characters outside the vocabulary (which and how
many), a negative ``--length``, ``--temperature`` < 0 and ``--top-k`` < 1. Bad checkpoint files are in
test_reliability.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from charlm.cli import app

runner = CliRunner()


def check(args: list[str], message: str, code: int = 2) -> None:
    result = runner.invoke(app, args)
    output = " ".join(result.output.split())  # Rich wraps long lines
    assert result.exit_code == code, result.output
    assert f"error: {message}" in output, result.output
    assert "Traceback" not in result.output


def train_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "smoke", "--data", str(corpus), "--out", str(out), "--name", "run", *extra]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"ROMEO:\xff\xfe what light\n" * 400, "is not UTF-8 text (invalid byte 0xff at offset 6); save it as UTF-8"),
], ids=["empty", "not-utf8"])
def test_bad_corpus(tmp_path: Path, content: bytes, message: str) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    check(train_args(corpus, tmp_path), f"corpus {corpus} {message}")


def test_corpus_folder_is_called_a_folder(tmp_path: Path) -> None:
    check(train_args(tmp_path, tmp_path), f"--data {tmp_path} is a folder; give a text file")


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "model.hidden_size=big"], "config key 'model.hidden_size' must be int, got 'big'"),
    (["--set", "model.dropout=lots"], "config key 'model.dropout' must be float, got 'lots'"),
    (["--set", "modle.hidden_size=3"], "unknown config section 'modle'; sections: data, model, optim, train, sample"),
    (["--set", "hidden_size=3"], "--set expects section.key=value, got 'hidden_size=3'"),
    (["--set", "data.bptt=-3"], "config key 'data.bptt' must be at least 1, got -3"),
    (["--set", "data.batch_size=0"], "config key 'data.batch_size' must be at least 1, got 0"),
    (["--set", "model.dropout=1.0"], "config key 'model.dropout' must be in [0, 1), got 1.0"),
    (["--set", "model.weight_drop=-0.1"], "config key 'model.weight_drop' must be in [0, 1), got -0.1"),
    (["--set", "optim.lr=-0.1"], "config key 'optim.lr' must not be negative, got -0.1"),
    (["--set", "sample.temperature=-1"], "config key 'sample.temperature' must not be negative, got -1.0"),
    (["--set", "sample.length=-1"], "config key 'sample.length' must not be negative, got -1"),
    (["--set", "train.on_nan=ignore"], "config key 'train.on_nan' must be 'stop' | 'skip', got 'ignore'"),
    (["--max-steps", "-5"], "config key 'train.max_steps' must be at least 1 (or -1: no limit), got -5"),
    (["--max-epochs", "0"], "config key 'train.max_epochs' must be at least 1 (or -1: no limit), got 0"),
    (["--max-time", "0"], "config key 'train.max_time' must be positive seconds or null, got 0.0"),
    (["--config", "nosuch"], "config 'nosuch' not found; give a YAML file or one of:"),
    (["--cell", "[red]lstm"], "unknown cell '[red]lstm'; valid cells:"),  # printed as given, not as markup
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_bad_config_value(tmp_path: Path, corpus_file: Path, extra: list[str], message: str) -> None:
    check(train_args(corpus_file, tmp_path, *extra), message)


@pytest.mark.parametrize(("text", "message"), [
    ("model:\n  hiden_size: 3\n", "unknown config key 'model.hiden_size'; keys of 'model': cell, embedding_size"),
    ("model: [1, 2\n", "config file {path} is not valid YAML: while parsing a flow sequence"),
    ("- 1\n- 2\n", "{path}: expected a mapping of sections (data, model, optim, train, sample)"),
], ids=["mistyped-key", "broken-yaml", "not-a-mapping"])
def test_bad_config_file(tmp_path: Path, corpus_file: Path, text: str, message: str) -> None:
    config = tmp_path / "mine.yaml"
    config.write_text(text)
    check(["train", "--config", str(config), "--data", str(corpus_file), "--out", str(tmp_path)],
          message.format(path=config))


@pytest.mark.parametrize(("extra", "message"), [
    (["--accelerator", "foo"], "invalid device settings (train.accelerator='foo', devices='auto', strategy='auto', "
                               "num_nodes=1, precision='32-true'): You selected an invalid accelerator name"),
    (["--devices", "0", "--accelerator", "cpu"], "invalid device settings (train.accelerator='cpu', devices=0, "),
    (["--precision", "64-bits"], "invalid device settings (train.accelerator='auto', devices='auto', "
                                 "strategy='auto', num_nodes=1, precision='64-bits'): Precision '64-bits' is invalid"),
    (["--accelerator", "tpu"], "invalid device settings (train.accelerator='tpu', devices='auto', strategy='auto', "
                               "num_nodes=1, precision='32-true'): Requirement 'torch_xla"),
    (["--strategy", "nosuch", "--precision", "32-true"], "invalid device settings (train.accelerator='auto', "
                                                         "devices='auto', strategy='nosuch', num_nodes=1, "
                                                         "precision='32-true'): You selected an invalid strategy "
                                                         "name: `strategy='nosuch'`"),
    (["--set", "train.threads=100000"], f"config key 'train.threads' must be at most {os.cpu_count()}, the number "
                                        "of CPUs here (or 0: torch's choice), got 100000"),
], ids=["accelerator", "devices", "precision", "tpu", "strategy", "threads"])
def test_bad_device_settings(tmp_path: Path, corpus_file: Path, extra: list[str], message: str) -> None:
    check(train_args(corpus_file, tmp_path, *extra), message)
    assert list(tmp_path.iterdir()) == []  # refused before the run folder was made


def test_output_folder_not_writable(tmp_path: Path, corpus_file: Path) -> None:
    blocker = tmp_path / "file.txt"  # a regular file where a folder should be (tests run as root: no chmod)
    blocker.write_text("not a folder")
    check(train_args(corpus_file, blocker / "sub"),
          f"--out {blocker / 'sub'} cannot be made: {blocker} is a regular file, not a folder; give another folder")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["eval", "--split", "train"], "--split must be val or test, got 'train'"),
    (["sample", "--num-samples", "0"], "--num-samples must be at least 1, got 0"),
], ids=["eval-batch-size", "eval-split", "sample-num-samples"])
def test_bad_eval_and_sample_options(trained_run: Path, args: list[str], message: str) -> None:
    check([*args, "--checkpoint", str(trained_run / "best.ckpt")], message)


@pytest.mark.parametrize(("content", "message"), [
    (None, "--text file {path} does not exist; give --text an existing text file"),
    ("R", "--text file {path} needs at least 2 characters to score"),
    ("ROMEO: «sweet» ~~\n", "--text file {path} has 4 character(s) outside the model's"),
], ids=["missing", "one-char", "unknown-chars"])
def test_bad_text_file(tmp_path: Path, trained_run: Path, content: str | None, message: str) -> None:
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    check(["eval", "--checkpoint", str(trained_run / "best.ckpt"), "--text", str(path)], message.format(path=path))
