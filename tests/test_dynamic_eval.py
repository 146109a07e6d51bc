"""`charlm eval --dynamic` and `--per-char`: the per-character NLLs add up to `charlm eval`'s loss, no score
depends on its own character or a later one, dynamic evaluation beats static on held-out text, and the
weights come back unchanged."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch
from conftest import shakespeare_text
from typer.testing import CliRunner

from charlm.cli import app
from charlm.data.datamodule import split_ids
from charlm.evaluation.dynamic import DynamicSettings, dynamic_char_nlls
from charlm.evaluation.scoring import char_nlls
from charlm.model.checkpoint import load_model

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())


def eval_json(*args: str) -> dict:
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def read_nlls(path: Path) -> list[tuple[int, str, float]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["position", "char", "nll"]
    return [(int(p), c, float(v)) for p, c, v in rows[1:]]


def test_static_per_char_adds_up_to_the_eval_loss(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    plain = eval_json("--checkpoint", ckpt, "--split", "val")
    with_file = eval_json("--checkpoint", ckpt, "--split", "val", "--per-char", str(tmp_path / "val.csv"))
    rows = read_nlls(tmp_path / "val.csv")
    assert len(rows) == plain["chars"] and [r[0] for r in rows] == list(range(1, len(rows) + 1))
    assert abs(sum(r[2] for r in rows) / len(rows) - plain["loss"]) < 1e-5
    assert abs(with_file["loss"] - plain["loss"]) < 1e-5 and with_file["streams"] == plain["streams"] > 1
    _, vocab, cfg, _ = load_model(trained_run / "best.ckpt")
    val = split_ids(vocab.encode(Path(cfg.data.path).read_text(encoding="utf-8")), cfg.data.val_fraction,
                    cfg.data.test_fraction).val
    escaped = {"\n": "\\n", "\\": "\\\\"}
    assert [r[1] for r in rows] == [escaped.get(c, c) for c in vocab.decode(val)[1:]]


def test_no_score_depends_on_its_own_character_or_later(trained_run: Path, tmp_path: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    text = shakespeare_text(20_600)[20_000:]
    j = 325  # in the middle of a dynamic segment (positions 301-350) and of a static stream (297-370)
    changed = text[:j] + ("e" if text[j] != "e" else "a") + text[j + 1 :]
    for mode in ([], ["--dynamic", "--dynamic-bptt", "50", "--dynamic-lr", "1e-3"]):
        scores = []
        for name, body in (("a", text), ("b", changed)):
            (tmp_path / f"{name}.txt").write_text(body, encoding="utf-8")
            eval_json("--checkpoint", ckpt, "--text", str(tmp_path / f"{name}.txt"), *mode,
                      "--per-char", str(tmp_path / f"{name}.csv"))
            scores.append([r[2] for r in read_nlls(tmp_path / f"{name}.csv")])
        before, after = scores
        assert before[: j - 1] == after[: j - 1], mode  # positions 1 .. j - 1 (entry p - 1): untouched
        assert before[j:] != after[j:], mode  # the change does reach the scores after it


def test_each_score_is_a_distribution_over_the_character_scored(trained_run: Path) -> None:
    """Put every character of the vocabulary in turn at position j: if the score of position j does not
    depend on the character there, the scores are -log of one distribution, so exp(-nll) sums to 1."""
    model, vocab, _, _ = load_model(trained_run / "best.ckpt")
    text, j = shakespeare_text(10_070)[10_000:], 45
    train = vocab.encode(shakespeare_text(1_000))
    settings = DynamicSettings(lr=3e-3, decay=0.01, bptt=20, rms_windows=1)
    static, dynamic = [], []
    for c in vocab.chars:
        ids = vocab.encode(text[:j] + c + text[j + 1 :])
        static.append(float(char_nlls(model, ids, batch_size=1, bptt=32)[j - 1]))
        dynamic.append(float(dynamic_char_nlls(model, ids, train, settings, train_batch_size=4, train_bptt=32)[j - 1]))
    assert abs(sum(math.exp(-v) for v in static) - 1) < 1e-5
    assert abs(sum(math.exp(-v) for v in dynamic) - 1) < 1e-5


def test_dynamic_beats_static_on_the_held_out_split(trained_run: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    static = eval_json("--checkpoint", ckpt, "--split", "test")
    one_stream = eval_json("--checkpoint", ckpt, "--split", "test", "--batch-size", "1")
    dynamic = eval_json("--checkpoint", ckpt, "--split", "test", "--dynamic", "--dynamic-lr", "1e-3",
                        "--dynamic-decay", "0")
    assert dynamic["chars"] == static["chars"] and dynamic["streams"] == 1
    assert dynamic["dynamic"]["bptt"] == 32  # the smoke run's data.bptt
    assert dynamic["loss"] < min(static["loss"], one_stream["loss"]) - 0.01


def test_dynamic_evaluation_puts_the_weights_back(trained_run: Path) -> None:
    model, vocab, _, _ = load_model(trained_run / "best.ckpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = vocab.encode(shakespeare_text(3_000)[2_000:])
    nll = dynamic_char_nlls(model, ids, ids, DynamicSettings(lr=1e-3, decay=0.01, bptt=40, rms_windows=2),
                            train_batch_size=4, train_bptt=40)
    assert nll.shape == (999,) and bool(torch.isfinite(nll).all())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_dynamic_option_errors(trained_run: Path) -> None:
    ckpt = str(trained_run / "best.ckpt")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic-lr", "1e-3") == (
        2, "error: --dynamic-lr sets up dynamic evaluation; add --dynamic")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--batch-size", "4") == (
        2, "error: --dynamic reads the text as one stream, in order, so that every score stays a prediction; "
           "leave out --batch-size (got 4) or give 1")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--dynamic-lr", "0") == (
        2, "error: --dynamic-lr must be positive, got 0.0")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--dynamic-decay", "2") == (
        2, "error: --dynamic-decay must be between 0 and 1, got 2.0")
    assert invoke("eval", "--checkpoint", ckpt, "--dynamic", "--dynamic-bptt", "0") == (
        2, "error: --dynamic-bptt must be at least 1, got 0")
