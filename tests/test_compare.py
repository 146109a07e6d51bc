"""``charlm compare``: the files and their rows, resuming, seeds, errors, and the no-matplotlib path.

One two-cell comparison (smoke config, 6 steps at a rate high enough to learn the character frequencies,
validation every 3) is trained once per module; the tests that change a comparison work on a copy of it.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import invoke

import charlm.tools.compare.run as compare_run
from charlm.data.corpus import sha256_of
from charlm.evaluation.metrics import LN2
from charlm.tools.compare.records import RUN_RECORD
from charlm.tools.compare.tables import RESULT_COLUMNS, RUN_COLUMNS
from charlm.training.fit import train as real_train
from charlm.util.errors import TrainingInterrupted


def compare_args(corpus: Path, out: Path, cells: str = "lstm,gru", *extra: str) -> list[str]:
    return ["compare", "--cells", cells, "--config", "smoke", "--data", str(corpus), "--out", str(out),
            "--max-steps", "6", "--set", "model.hidden_size=32", "--set", "train.val_every_steps=3",
            "--set", "train.checkpoint_every_steps=3", "--set", "optim.lr=0.03", "--set", "optim.warmup_steps=0",
            *extra]


def logged_times(run_dir: Path) -> dict[int, float]:
    """``{optimizer steps done: elapsed_s}`` of the validation rows the run logged."""
    return {int(r["step"]) + 1: float(r["elapsed_s"]) for r in read_csv(run_dir / "metrics.csv")[1]
            if r.get("val_loss")}




def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def counting_train(monkeypatch: pytest.MonkeyPatch,
                   before: Callable[[Any, Path], Any] | None = None) -> list[tuple[str, Path | None]]:
    """Replace compare's ``train`` with one that records (run folder name, resume checkpoint) per call."""
    calls: list[tuple[str, Path | None]] = []

    def wrapped(config: Any, *, resume: Path | None = None, run_dir: Path, console: Any = None) -> Any:
        calls.append((run_dir.name, resume))
        if before is not None:
            return before(config, run_dir) or real_train(config, resume=resume, run_dir=run_dir, console=console)
        return real_train(config, resume=resume, run_dir=run_dir, console=console)

    monkeypatch.setattr(compare_run, "run_training", wrapped)
    return calls


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures run before the autouse one-thread fixture
    try:
        code, output = invoke(*compare_args(corpus_file, out))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, output
    return out, output


@pytest.fixture
def copy_of(finished: tuple[Path, str], tmp_path: Path) -> Path:
    target = tmp_path / "cmp"
    shutil.copytree(finished[0], target)  # copy2: modification times are kept
    return target


def test_two_cells_write_all_files(finished: tuple[Path, str], corpus_file: Path) -> None:
    out, output = finished
    text = corpus_file.read_text(encoding="utf-8")
    uniform = math.log2(len(set(text)))  # bits per character of a uniform guess
    for name in ("results.csv", "runs.csv", "results.json", "results.md", "curves.png"):
        assert (out / name).is_file(), name
    for run in ("lstm-seed1234", "gru-seed1234"):
        for name in ("best.ckpt", "last.ckpt", "metrics.csv", RUN_RECORD):
            assert (out / run / name).is_file(), f"{run}/{name}"

    columns, rows = read_csv(out / "results.csv")
    assert columns == RESULT_COLUMNS
    assert [r["cell"] for r in rows] == ["lstm", "gru"]
    for r in rows:
        assert r["runs"] == "1" and r["seeds"] == "1234" and r["steps"] == "6" and r["hidden_size"] == "32"
        assert r["best_step"] in ("3", "6")
        assert float(r["val_bpc"]) == pytest.approx(float(r["val_loss"]) / LN2, rel=1e-5)
        assert float(r["test_bpc"]) == pytest.approx(float(r["test_loss"]) / LN2, rel=1e-5)
        assert float(r["test_ppl"]) == pytest.approx(math.exp(float(r["test_loss"])), rel=1e-5)
        assert 0 < float(r["val_bpc"]) < uniform - 0.6  # six steps take it well below a uniform guess
        assert float(r["train_seconds"]) > 0 and float(r["train_chars_per_s"]) > 0
        assert r["val_bpc_std"] == ""  # one seed: no spread
    assert int(rows[0]["parameters"]) > int(rows[1]["parameters"])  # four gate blocks against three
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1 and best[0]["val_bpc"] == min((r["val_bpc"] for r in rows), key=float)

    run_columns, run_rows = read_csv(out / "runs.csv")
    assert run_columns == RUN_COLUMNS and [r["run_dir"] for r in run_rows] == ["lstm-seed1234", "gru-seed1234"]
    assert {(r["vocab_size"], r["diverged"]) for r in run_rows} == {(str(len(set(text))), "False")}

    document = json.loads((out / "results.json").read_text())
    assert document["complete"] is True and document["curves"] == "curves.png"
    # the corpus by name, length and hash (the folder it lies in is the user's)
    assert document["settings"]["corpus"] == {"file": corpus_file.name, "sha256": sha256_of(corpus_file),
                                              "chars": len(text)}
    assert document["best"] == best[0]["cell"]
    assert [c["cell"] for c in document["cells"]] == ["lstm", "gru"]
    for run in document["runs"]:
        steps = [p["step"] for p in run["curve"]]
        assert steps == [3, 6], steps  # validation fired at 3 and 6
        logged = logged_times(out / run["run_dir"])  # the training time the run itself logged
        assert [p["seconds"] for p in run["curve"]] == [pytest.approx(logged[3]), pytest.approx(logged[6])]
        assert 0 < logged[3] < logged[6] <= run["train_seconds"]

    md = (out / "results.md").read_text()
    assert "| cell | parameters | val loss | val bpc | test bpc | test ppl | training time |" in md
    assert f"★ **{best[0]['cell']}**" in md and "![validation bits per character" in md
    assert f"- corpus: {corpus_file.name} ({len(text):,} characters, sha256 {sha256_of(corpus_file)[:12]}…)" in md

    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "val bpc" in output and "★" in output and "2 run(s) trained, 0 already finished" in output


def test_resume_skips_finished_cells_and_resumes_the_unfinished_one(
        copy_of: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = copy_of
    shutil.rmtree(out / "gru-seed1234")  # as if the comparison had not reached gru yet
    lstm_best = out / "lstm-seed1234" / "best.ckpt"
    lstm_mtime = lstm_best.stat().st_mtime_ns

    def interrupt_gru(config: Any, run_dir: Path) -> None:
        short = copy.deepcopy(config)
        short.train.max_steps = 3  # train half the budget, then "Ctrl-C"
        real_train(short, run_dir=run_dir)
        raise KeyboardInterrupt

    calls = counting_train(monkeypatch, interrupt_gru)
    code, _ = invoke(*compare_args(corpus_file, out))
    assert code != 0
    assert calls == [("gru-seed1234", None)]  # lstm was finished: not retrained
    record = json.loads((out / "gru-seed1234" / RUN_RECORD).read_text())
    assert record["result"] is None and (out / "gru-seed1234" / "last.ckpt").is_file()

    calls = counting_train(monkeypatch)
    code, output = invoke(*compare_args(corpus_file, out))
    assert code == 0, output
    assert calls == [("gru-seed1234", out / "gru-seed1234" / "last.ckpt")]  # resumed, from its last.ckpt
    assert lstm_best.stat().st_mtime_ns == lstm_mtime
    assert "1 run(s) already finished, 1 to train" in output
    record = json.loads((out / "gru-seed1234" / RUN_RECORD).read_text())
    assert "segments" not in record and sorted(p.name for p in (out / "gru-seed1234").glob("metrics*")) == [
        "metrics.csv"]  # one metrics.csv, continued by the resumed run
    result = record["result"]
    assert result["steps"] == 6
    assert [p["step"] for p in result["curve"]] == [3, 6]  # over both sessions
    # each point at the time its own session logged; the second session's clock went on from the checkpoint's
    logged = logged_times(out / "gru-seed1234")
    assert [p["seconds"] for p in result["curve"]] == [pytest.approx(logged[3]), pytest.approx(logged[6])]
    assert logged[6] > logged[3] and result["train_seconds"] >= logged[6]
    _, rows = read_csv(out / "results.csv")
    assert [r["cell"] for r in rows] == ["lstm", "gru"]

    calls = counting_train(monkeypatch)
    code, output = invoke(*compare_args(corpus_file, out))
    assert code == 0 and calls == [] and "2 run(s) already finished, 0 to train" in output


@pytest.mark.parametrize(("code", "what"), [(130, "Ctrl-C"), (143, "SIGTERM")])
def test_an_interrupted_comparison_keeps_the_signals_exit_code(
        code: int, what: str, tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def stopped(config: Any, *, resume: Path | None = None, run_dir: Path, console: Any = None) -> Any:
        raise TrainingInterrupted(f"training interrupted by {what} at step 2", code)

    monkeypatch.setattr(compare_run, "run_training", stopped)
    out = tmp_path / "cmp"
    exit_code, output = invoke(*compare_args(corpus_file, out, "lstm"))
    assert exit_code == code
    assert (f"stopped: comparison interrupted while training lstm-seed1234; 0 run(s) finished and recorded. "
            f"Run the same command with --out {out} to resume") in output
    assert json.loads((out / "lstm-seed1234" / RUN_RECORD).read_text())["result"] is None


def test_changed_settings_are_refused_not_mixed(copy_of: Path, corpus_file: Path) -> None:
    args = compare_args(corpus_file, copy_of)
    args[args.index("--max-steps") + 1] = "7"
    code, output = invoke(*args)
    assert code == 2 and "was trained with other settings (train.max_steps: 6 -> 7)" in output


def test_a_record_from_before_a_config_key_existed_still_matches(copy_of: Path, corpus_file: Path) -> None:
    """A key added to the config since the runs were recorded (here data.drop_unknown) is no difference
    while it has its default value; off the default it is one."""
    for record_path in copy_of.glob("*/compare-run.json"):
        record = json.loads(record_path.read_text(encoding="utf-8"))
        del record["fingerprint"]["data"]["drop_unknown"]
        record_path.write_text(json.dumps(record), encoding="utf-8")
    code, output = invoke(*compare_args(corpus_file, copy_of))
    assert code == 0 and "0 run(s) trained, 2 already finished" in " ".join(output.split())
    code, output = invoke(*compare_args(corpus_file, copy_of), "--set", "data.drop_unknown=true")
    assert code == 2 and "was trained with other settings (data.drop_unknown: None -> True)" in output


def test_seeds_report_mean_and_spread(copy_of: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_train(monkeypatch)
    code, output = invoke(*compare_args(corpus_file, copy_of, "gru", "--seeds", "1234,7"))
    assert code == 0, output
    assert calls == [("gru-seed7", None)]  # seed 1234 was already trained
    _, runs = read_csv(copy_of / "runs.csv")
    assert [(r["cell"], r["seed"]) for r in runs] == [("gru", "1234"), ("gru", "7")]
    val = [float(r["val_bpc"]) for r in runs]
    assert val[0] != val[1]  # another seed, another model
    _, rows = read_csv(copy_of / "results.csv")
    assert len(rows) == 1
    row = rows[0]
    assert row["runs"] == "2" and row["seeds"] == "1234 7"
    assert float(row["val_bpc"]) == pytest.approx(statistics.fmean(val), abs=1e-6)
    assert float(row["val_bpc_std"]) == pytest.approx(statistics.stdev(val), abs=1e-6)
    assert float(row["val_bpc_min"]) == pytest.approx(min(val), abs=1e-6)
    assert float(row["val_bpc_max"]) == pytest.approx(max(val), abs=1e-6)
    assert row["test_bpc_std"] != ""
    assert "±" in output and "val bpc range" in output and "2/2" in output
    md = (copy_of / "results.md").read_text()
    assert "val bpc min–max" in md and "seeds done" in md and "mean ± sample std over seeds" in md


def test_without_matplotlib_everything_else_is_written(
        copy_of: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError
    for name in ("curves.png", "results.csv", "results.json", "results.md"):
        (copy_of / name).unlink()
    calls = counting_train(monkeypatch)
    code, output = invoke(*compare_args(corpus_file, copy_of))
    assert code == 0, output
    assert calls == []
    assert "curves.png not written: matplotlib is not installed" in output and "charlm[plot]" in output
    assert not (copy_of / "curves.png").exists()
    for name in ("results.csv", "results.json", "results.md"):
        assert (copy_of / name).is_file(), name
    assert json.loads((copy_of / "results.json").read_text())["curves"] is None
    assert "![" not in (copy_of / "results.md").read_text()

def test_result_files_are_readable_by_others(finished: tuple[Path, str]) -> None:
    out = finished[0]
    mask = os.umask(0)
    os.umask(mask)
    for name in ("results.csv", "runs.csv", "results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize(("seeds", "message"), [
    ("-1", "each of --seeds must be a whole number from 0 to 4294967295, got -1"),
    ("1,1180591620717411303424", "each of --seeds must be a whole number from 0 to 4294967295, "
                                 "got 1180591620717411303424"),
])
def test_out_of_range_seeds_are_refused_before_anything_is_made(
        seeds: str, message: str, tmp_path: Path, corpus_file: Path) -> None:
    code, output = invoke(*compare_args(corpus_file, tmp_path / "cmp", "lstm", f"--seeds={seeds}"))
    assert code == 2 and "Traceback" not in output
    assert f"error: {message}" in output
    assert not (tmp_path / "cmp").exists()


def test_curves_of_runs_recorded_before_times_were_logged_have_no_times(
        copy_of: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for run in ("lstm-seed1234", "gru-seed1234"):  # records of version 1 placed their times by step count
        path = copy_of / run / RUN_RECORD
        path.write_text(json.dumps({**json.loads(path.read_text()), "version": 1}))
    calls = counting_train(monkeypatch)
    code, output = invoke(*compare_args(corpus_file, copy_of))
    assert code == 0 and calls == [], output
    runs = json.loads((copy_of / "results.json").read_text())["runs"]
    assert [[p["seconds"] for p in r["curve"]] for r in runs] == [[None, None], [None, None]]
    assert [[p["step"] for p in r["curve"]] for r in runs] == [[3, 6], [3, 6]]  # still drawn against steps
    assert (copy_of / "curves.png").is_file()


def test_a_diverged_run_does_not_flatten_the_others_curves() -> None:
    """The y axis stops at 1.5x the median curve's highest point; the curves above it are named."""
    from charlm.tools.compare.plot import Curve, y_limits

    curves = [Curve("V", [1, 2], [1.0, 2.0], [3.0, 2.6]), Curve("NP", [1, 2], [1.0, 2.0], [3.1, 2.6]),
              Curve("NOAF", [1, 2], [1.0, 2.0], [650.0, 117.0]), Curve("NOAF", [1, 2], [1.0, 2.0], [3.2, 2.8])]
    bottom, top, above = y_limits(curves)
    assert above == ["NOAF"]
    assert 2.6 > bottom > 2.3 and 4.8 < top < 5.0  # 1.5 x 3.2 (the median of the highs), and a margin
    assert y_limits(curves[:2])[2] == []  # nothing clipped: the axis reaches the highest point
