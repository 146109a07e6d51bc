"""The command line through Typer's runner: train, eval, sample, data, and each error message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import invoke_as_printed as invoke


def test_train_writes_best_last_config_and_metrics(trained_run: Path) -> None:
    for name in ("best.ckpt", "last.ckpt", "config.yaml", "metrics.csv"):
        assert (trained_run / name).is_file(), name


def test_eval_json(trained_run: Path, corpus_file: Path) -> None:
    code, output = invoke("eval", "--checkpoint", str(trained_run / "best.ckpt"), "--split", "test", "--json")
    assert code == 0, output
    result = json.loads(output)
    assert {"loss", "bpc", "perplexity", "chars"} <= result.keys()
    assert result["chars"] == int(len(corpus_file.read_text()) * 0.05) - 1
    assert abs(result["bpc"] * 0.6931471805599453 - result["loss"]) < 1e-9


def test_eval_text_file_and_unknown_chars(trained_run: Path, tmp_path: Path) -> None:
    ok = tmp_path / "ok.txt"
    ok.write_text("ROMEO:\nWhat say you?\n")
    code, output = invoke("eval", "--checkpoint", str(trained_run / "best.ckpt"), "--text", str(ok), "--json")
    assert code == 0, output
    assert json.loads(output)["chars"] == len(ok.read_text()) - 1
    bad = tmp_path / "bad.txt"
    bad.write_text("ROMEO: ~~ §\n")
    code, output = invoke("eval", "--checkpoint", str(trained_run / "best.ckpt"), "--text", str(bad))
    assert code == 2
    assert "has 3 character(s) outside the model's" in output and "'~' (2x)" in output


def test_sample_is_deterministic_and_starts_with_prime(trained_run: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    args = ("sample", "--checkpoint", ckpt, "--prime", "ROMEO:", "--length", "60", "--seed", "7")
    code, first = invoke(*args)
    assert code == 0, first
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= 60
    assert invoke(*args)[1] == first
    assert invoke("sample", "--checkpoint", ckpt, "--prime", "ROMEO:", "--length", "60", "--seed", "8")[1] != first
    greedy = ("sample", "--checkpoint", ckpt, "--prime", "ROMEO:", "--length", "30", "--temperature", "0")
    assert invoke(*greedy)[1] == invoke(*greedy, "--seed", "3")[1]
    code, many = invoke("sample", "--checkpoint", ckpt, "--num-samples", "3", "--length", "20", "--seed", "1")
    assert code == 0 and many.count("=== sample") == 3


@pytest.mark.parametrize(("args", "message"), [
    (("--prime", "ROMEO~"), "--prime has 1 character(s) outside the model's"),
    (("--temperature", "-1"), "--temperature must be >= 0, got -1.0"),
    (("--top-k", "0"), "--top-k must be at least 1, got 0"),
    (("--length", "-5"), "--length must be >= 0, got -5"),
])
def test_sample_errors(trained_run: Path, args: tuple[str, ...], message: str) -> None:
    code, output = invoke("sample", "--checkpoint", str(trained_run / "best.ckpt"), *args)
    assert code == 2 and message in output and "Traceback" not in output


def test_newest_run_is_the_default(trained_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained_run.parent.parent)
    (trained_run.parent.parent / "checkpoints").mkdir(exist_ok=True)
    target = trained_run.parent.parent / "checkpoints" / "r1"
    if not target.exists():
        target.symlink_to(trained_run, target_is_directory=True)
    code, output = invoke("sample", "--length", "5", "--seed", "1", "--prime", "A")
    assert code == 0 and output.startswith("A")


def test_errors_without_checkpoint_or_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = invoke("sample")
    assert code == 2 and "no checkpoint found under checkpoints/" in output
    code, output = invoke("train", "--config", "smoke", "--data", str(tmp_path / "nope.txt"))
    assert code == 2 and "does not exist; give --data an existing text file" in output
    code, output = invoke("train", "--config", "smoke", "--cell", "lstmx")
    assert code == 2 and "unknown cell 'lstmx'; valid cells:" in output and "gru" in output
    code, output = invoke("train", "--config", "smoke", "--set", "model.hiddn=3")
    assert code == 2 and "unknown config key 'model.hiddn'" in output


def test_short_corpus_is_refused(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello there\n" * 5)
    code, output = invoke("train", "--config", "smoke", "--data", str(tiny), "--out", str(tmp_path))
    assert code == 2 and "is too short" in output and "one batch needs" in output


def test_data_command(corpus_file: Path) -> None:
    code, output = invoke("data", "--data", str(corpus_file))
    assert code == 0, output
    assert "sha256" in output and "train split" in output and f"{len(corpus_file.read_text()):,}" in output


def test_round_trip_in_a_fresh_process(trained_run: Path) -> None:
    ckpt = str(trained_run / "last.ckpt")
    evaluated = subprocess.run([sys.executable, "-m", "charlm", "eval", "--checkpoint", ckpt, "--json"],
                               capture_output=True, text=True, check=True)
    assert json.loads(evaluated.stdout)["loss"] > 0
    sampled = subprocess.run([sys.executable, "-m", "charlm", "sample", "--checkpoint", ckpt, "--prime", "KING",
                              "--length", "20", "--seed", "2"], capture_output=True, text=True, check=True)
    assert sampled.stdout.startswith("KING") and len(sampled.stdout) >= 24


@pytest.mark.parametrize("command", ["train", "eval", "sample", "data", "compare"])
def test_help_of_each_command(command: str) -> None:
    """``--help`` renders (Typer and Click versions that do not fit together fail here first)."""
    code, output = invoke(command, "--help")
    assert code == 0 and "Usage:" in output and "--help" in output, output
