"""Training: the loss goes down, the state is carried and detached, evaluation is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from charlm.config import load_config
from charlm.data.datamodule import split_ids
from charlm.data.streams import Batch
from charlm.data.vocab import Vocab
from charlm.evaluation.metrics import LN2
from charlm.evaluation.scoring import evaluate_ids
from charlm.model.char_lm import CharLM
from charlm.training.fit import train
from charlm.training.lightning_module import CharLMModule
from charlm.training.progress import ProgressBar


def _module(**model: object) -> CharLMModule:
    cfg = load_config("smoke", [f"model.{k}={v}" for k, v in model.items()])
    return CharLMModule(cfg.to_dict(), "abcdefgh")


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_hidden_state_is_carried_and_detached() -> None:
    torch.manual_seed(0)
    module = _module()
    module.eval()  # no dropout, so two windows must equal one long window
    x = torch.randint(0, 8, (3, 20))
    y = torch.randint(0, 8, (3, 20))
    module.training_step(Batch(x[:, :10], y[:, :10]), 0)
    first = module._train_states
    assert first is not None and all(not t.requires_grad for s in first for t in s)
    module.training_step(Batch(x[:, 10:], y[:, 10:]), 1)
    carried = module._train_states
    whole = module.model(x).states
    for a, b in zip(carried, whole, strict=True):
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(ta, tb)
    module.training_step(Batch(x[:, :10], y[:, :10]), 0)  # batch 0 = a new epoch: state reset
    for a, b in zip(module._train_states, first, strict=True):
        for ta, tb in zip(a, b, strict=True):
            torch.testing.assert_close(ta, tb)


def _sharp_model() -> CharLM:
    """A small model whose per-character losses spread widely and whose state reaches far back, so a
    character skipped or scored twice, or a state not carried, moves the loss far beyond rounding."""
    torch.manual_seed(0)
    model = CharLM(8, load_config("smoke").model).eval()
    with torch.no_grad():
        model.encoder.weight.mul_(30)  # tied to the decoder: confident, varied predictions
        for layer in model.layers:
            layer.weight_hh_l0.mul_(3)  # a long memory
    return model


def _streams_scored_in_one_go(model: CharLM, ids: torch.Tensor, batch_size: int) -> float:
    """Mean NLL (nats) of ``ids[1:]`` with the text cut into ``batch_size`` contiguous streams of equal
    length, the last one also taking the remainder, each scored in a single forward from a zero state."""
    n = ids.numel() - 1
    length = n // batch_size
    starts = [r * length for r in range(batch_size)]
    ends = [*starts[1:], n]
    total = 0.0
    with torch.no_grad():
        for a, b in zip(starts, ends, strict=True):
            logits = model(ids[a:b].view(1, -1)).logits[0]
            total += torch.nn.functional.cross_entropy(logits, ids[a + 1:b + 1], reduction="sum").item()
    return total / n


@pytest.mark.parametrize("batch_size", [1, 9, 16])
def test_evaluation_is_exact_whatever_the_window_split(batch_size: int) -> None:
    """Every character scored once, the state carried from window to window: the windows' length
    changes nothing but float rounding (here at most ~1e-7 relative)."""
    model = _sharp_model()
    ids = torch.randint(0, 8, (501,))
    expected = _streams_scored_in_one_go(model, ids, batch_size)
    for bptt in (1, 7, 13, 37, 1000):
        got = evaluate_ids(model, ids, batch_size=batch_size, bptt=bptt)
        assert got["chars"] == 500
        assert got["loss"] == pytest.approx(expected, rel=1e-6, abs=0), f"bptt={bptt}"
        assert got["bpc"] == pytest.approx(expected / LN2, rel=1e-6, abs=0)
    # the streams restart from zero at their boundaries, and that must show: else this model could
    # not tell a carried state from a dropped one
    assert abs(expected - _streams_scored_in_one_go(model, ids, batch_size + 1)) > 1e-3


def test_smoke_training_lowers_the_loss(trained_run: Path, corpus_file: Path) -> None:
    """The training loss falls, and the held-out loss ends far below that of an untrained network of its shape.

    The smoke run's two validations (steps 20 and 40) both come after the network has learned the
    character frequencies, and the 40 steps are too few to learn much more: which of the two is lower
    is not something the smoke run decides, so the held-out check compares with the untrained network."""
    import csv

    rows = list(csv.DictReader((trained_run / "metrics.csv").open()))
    train_losses = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    val_losses = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert len(train_losses) >= 4 and len(val_losses) >= 2
    assert train_losses[-1] < train_losses[0] - 0.5
    cfg = load_config(str(trained_run / "config.yaml"))
    vocab = Vocab(torch.load(trained_run / "best.ckpt", weights_only=True)["hyper_parameters"]["vocab"])
    val_ids = split_ids(vocab.encode(corpus_file.read_text(encoding="utf-8")), cfg.data.val_fraction,
                        cfg.data.test_fraction).val
    torch.manual_seed(cfg.train.seed)
    untrained = CharLM(len(vocab), cfg.model).eval()
    before = evaluate_ids(untrained, val_ids, batch_size=cfg.data.eval_batch_size, bptt=cfg.data.bptt)["loss"]
    assert before > torch.log(torch.tensor(float(len(vocab)))).item() - 0.1  # untrained: about uniform
    assert val_losses[-1] < before - 0.5


class TrainBarText(L.Callback):
    """The training bar's text after each step (this callback runs after the bar's own hooks)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = trainer.progress_bar_callback
        assert isinstance(bar, ProgressBar) and bar.progress is not None
        self.seen += [task.description.strip() for task in bar.progress.tasks if task.id == bar.train_progress_bar_id]


@pytest.mark.parametrize(("max_epochs", "expected"), [(-1, "Epoch 0"), (5, "Epoch 0/4")])
def test_progress_bar_epoch_reads_without_a_negative_limit(corpus_file: Path, tmp_path: Path, max_epochs: int,
                                                           expected: str) -> None:
    """Time- or step-limited runs have max_epochs = -1: Lightning's bar would print "Epoch 0/-2"."""
    text = TrainBarText()
    train(load_config("smoke", [f"data.path={corpus_file}", f"train.out={tmp_path}", "train.progress=true",
                                f"train.max_epochs={max_epochs}", "train.max_steps=2", "sample.enabled=false"]),
          callbacks=[text])
    assert text.seen == [expected, expected]


class TrainBarCounts(L.Callback):
    """(task id, completed, total) of the training bar after each step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, float, float | None]] = []
        self.epochs: set[int] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = trainer.progress_bar_callback
        assert isinstance(bar, ProgressBar) and bar.progress is not None
        task = bar.train_progress_bar
        self.seen.append((int(task.id), task.completed, task.total))
        self.epochs.add(trainer.current_epoch)


def test_progress_bar_counts_the_whole_budget_across_epochs(corpus_file: Path, tmp_path: Path) -> None:
    """One bar for the run: steps done of train.max_steps, going on over epoch boundaries (the excerpt's training
    split is a few windows per epoch), with the time left among its columns; a resumed run starts it where it
    resumed."""
    overrides = [f"data.path={corpus_file}", "train.progress=true", "train.max_steps=30", "train.val_every_steps=0",
                 "sample.enabled=false", "data.batch_size=32", "data.bptt=128"]
    counts = TrainBarCounts()
    result = train(load_config("smoke", [*overrides, f"train.out={tmp_path}"]), callbacks=[counts])
    assert result.steps == 30 and len(counts.epochs) >= 3
    assert {task for task, _, _ in counts.seen} == {counts.seen[0][0]}  # one task, never a new one per epoch
    assert [done for _, done, _ in counts.seen] == list(range(1, 31)) and {t for _, _, t in counts.seen} == {30}
    resumed = TrainBarCounts()
    config = load_config("smoke", [*overrides, f"train.out={tmp_path}", "train.max_steps=40"])
    train(config, resume=result.run_dir / "last.ckpt", run_dir=result.run_dir, callbacks=[resumed])
    assert [done for _, done, _ in resumed.seen] == list(range(31, 41)) and {t for _, _, t in resumed.seen} == {40}

def test_the_time_column_says_elapsed_and_left_at_the_recent_rate() -> None:
    """Rich's estimate from the steps of its recent window: 10 steps in 20 s, 90 to go -> about 3:00 left."""
    from rich.progress import Progress

    from charlm.training.progress import TimeLeftColumn

    now = [1000.0]
    progress = Progress(get_time=lambda: now[0])
    task = progress.add_task("train", total=100)
    for _ in range(10):
        now[0] += 2.0
        progress.advance(task)
    column = TimeLeftColumn("white")
    assert column.render(progress.tasks[0]).plain == "0:20 elapsed, about 3:00 left"
    now[0] += 3600.0
    progress.update(task, completed=100)
    assert column.render(progress.tasks[0]).plain == "1:00:20"
