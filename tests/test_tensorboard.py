"""``--logger tensorboard``: Lightning's TensorBoardLogger beside metrics.csv, read back with TensorBoard's own
reader; a resumed run continues its event folder; ``compare`` writes one TensorBoard run per cell; without
the package the flag says what to install."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import shakespeare_text, smoke_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginEventAccumulator
from typer.testing import CliRunner

from charlm.cli import app
from charlm.config import load_config
from charlm.training.loggers import TENSORBOARD_MISSING
from charlm.util.errors import CharlmError

runner = CliRunner()
SCALARS = ("train_loss", "train_bpc", "lr", "grad_norm", "train_chars_per_s", "val_loss", "val_bpc")


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("short") / "short.txt"
    path.write_text(shakespeare_text(6000), encoding="utf-8")
    return path


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_tensorboard_beside_csv_holds_every_metric_and_the_samples(short_corpus: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, smoke_args(short_corpus, tmp_path, "tb", "--max-steps", "20",
                                           "--set", "train.val_every_steps=10", "--logger", "csv",
                                           "--logger", "tensorboard"))
    assert result.exit_code == 0, result.output
    run = tmp_path / "tb"
    assert sorted(p.name for p in (run / "tensorboard").iterdir() if p.name.startswith("events.")) != []
    board = events(run / "tensorboard")
    assert set(SCALARS) <= set(board.Tags()["scalars"])
    with (run / "metrics.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for tag in SCALARS:  # the same values at the same steps as metrics.csv (float32 in the event file)
        logged = [(int(r["step"]), float(r[tag])) for r in rows if r.get(tag)]
        read = scalars(board, tag)
        assert [s for s, _ in read] == [s for s, _ in logged], tag
        assert [v for _, v in read] == pytest.approx([v for _, v in logged], rel=1e-6), tag
    assert [s for s, _ in scalars(board, "val_loss")] == [9, 19]
    samples = board.Tensors("sample/text_summary")
    assert [e.step for e in samples] == [9, 19]  # as val_loss
    for event in samples:
        text = event.tensor_proto.string_val[0].decode()
        assert text.startswith("    ROMEO:")  # the prime, then 40 generated characters, as a Markdown code block
        assert len(text.replace("\n    ", "\n")) == len("    ROMEO:") + 40


def test_a_resumed_run_continues_its_event_folder_without_repeating_steps(short_corpus: Path, tmp_path: Path) -> None:
    """Killed after step 20 with its last checkpoint at step 10 (the checkpoint is put back by hand): the
    steps logged again replace those of the lost session, in the same folder."""
    args = smoke_args(short_corpus, tmp_path, "tb", "--set", "train.loggers=tensorboard",
                      "--set", "train.val_every_steps=10")
    assert runner.invoke(app, [*args, "--max-steps", "10"]).exit_code == 0
    run = tmp_path / "tb"
    shutil.copy(run / "last.ckpt", tmp_path / "step10.ckpt")
    resume = ["--resume", str(run / "last.ckpt"), "--max-steps", "20"]
    assert runner.invoke(app, [*args, *resume]).exit_code == 0
    shutil.copy(tmp_path / "step10.ckpt", run / "last.ckpt")  # as if killed before step 20's checkpoint
    result = runner.invoke(app, [*args, *resume])
    assert result.exit_code == 0, result.output
    assert not (run / "metrics.csv").exists()  # tensorboard alone
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["tensorboard"]
    assert len(list((run / "tensorboard").glob("events.*"))) == 3  # one file per session, one folder
    # the reader TensorBoard's server uses (scalars and text alike are tensors there); the older
    # EventAccumulator purges the scalars too, but not the text
    board = PluginEventAccumulator(str(run / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Tensors("train_loss")] == [4, 9, 14, 19]
    assert [e.step for e in board.Tensors("val_loss")] == [9, 19]
    assert [e.step for e in board.Tensors("sample/text_summary")] == [9, 19]


def test_compare_writes_one_tensorboard_run_per_cell(short_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--cells", "lstm,gru", "--config", "smoke", "--data", str(short_corpus),
                                 "--max-steps", "10", "--set", "train.val_every_steps=5", "--out", str(out),
                                 "--logger", "tensorboard"])
    assert result.exit_code == 0, result.output
    boards = EventMultiplexer().AddRunsFromDirectory(str(out))
    boards.Reload()
    runs = sorted(boards.Runs())
    assert runs == ["gru-seed1234/tensorboard", "lstm-seed1234/tensorboard"]
    for name in runs:
        assert [e.step for e in boards.Scalars(name, "val_loss")] == [4, 9]
        assert (out / name.split("/")[0] / "metrics.csv").is_file()  # compare reads its curves from there


def test_the_logger_names_are_checked() -> None:
    assert load_config("smoke", ["train.loggers=CSV, tensorboard,csv"]).train.loggers == "csv,tensorboard"
    with pytest.raises(CharlmError) as caught:
        load_config("smoke", ["train.loggers=csv,wandb"])
    assert str(caught.value) == ("config key 'train.loggers' (--logger) must name one or more of csv, tensorboard "
                                 "(comma-separated), got 'csv,wandb'")


def test_without_tensorboard_the_flag_says_what_to_install(short_corpus: Path, tmp_path: Path) -> None:
    """The package made unimportable in a fresh process (a ``None`` in ``sys.modules`` makes every
    ``import tensorboard`` fail): one sentence, exit 2, and no run folder."""
    code = ("import sys; sys.modules['tensorboard'] = None; from charlm.cli import app; "
            f"app({smoke_args(short_corpus, tmp_path, 'tb', '--logger', 'tensorboard')!r}, prog_name='charlm')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert " ".join(done.stderr.split()) == f"error: {TENSORBOARD_MISSING}"
    assert TENSORBOARD_MISSING.endswith('pip install "charlm[tensorboard]"')
    assert not (tmp_path / "tb").exists()
