"""The learning-rate schedule is a Lightning LR scheduler, and the split figures are logged metric objects."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from charlm.config import load_config
from charlm.evaluation.metrics import LN2, split_metrics
from charlm.training.fit import train
from charlm.training.lightning_module import CharLMModule
from charlm.training.resume import resolve_resume

pytestmark = pytest.mark.filterwarnings("ignore:The dirpath has changed")  # a copied run folder: expected
LR, MIN_LR, STEPS = 0.01, 0.001, 40  # configs/smoke.yaml: cosine over 40 steps, as trained_run was trained


def cosine(done: int, steps: int) -> float:
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1.0 + math.cos(math.pi * done / steps))


def test_configure_optimizers_returns_a_step_scheduler() -> None:
    module = CharLMModule(load_config("smoke", ["optim.lr=0.5", "optim.warmup_steps=4"]).to_dict(), "abc")
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(scheduler, dict) and scheduler["interval"] == "step"
    assert isinstance(scheduler["scheduler"], LambdaLR) and scheduler["scheduler"].optimizer is optimizer
    assert [group["lr"] for group in optimizer.param_groups] == [0.5 * 1 / 4, 0.5 * 1 / 4]  # warm-up's first step


def test_the_checkpoint_keeps_the_schedulers_state(trained_run: Path) -> None:
    """Lightning saves the scheduler with the optimizer: after the last step it holds the rate of the next."""
    (state,) = torch.load(trained_run / "last.ckpt", weights_only=True)["lr_schedulers"]
    assert state["last_epoch"] == STEPS and state["_last_lr"] == [cosine(STEPS, STEPS), cosine(STEPS, STEPS)]


class Rates(L.Callback):
    """(steps done, learning rate) at every optimizer step."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.rows.append((trainer.global_step, optimizer.param_groups[0]["lr"]))


@pytest.mark.parametrize("without_scheduler_state", [False, True], ids=["checkpoint", "older-checkpoint"])
def test_a_resumed_run_follows_the_budget_it_resumes_with(tmp_path: Path, trained_run: Path,
                                                          without_scheduler_state: bool) -> None:
    """Resumed with a larger step budget, the first step already takes the rate the new budget gives (the
    restored scheduler held the old budget's); so does a checkpoint written before the schedule was a
    scheduler (no scheduler state, and a stale rate in the optimizer's state)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    if without_scheduler_state:
        ckpt = torch.load(run / "last.ckpt", weights_only=True)
        ckpt["lr_schedulers"] = []
        for group in ckpt["optimizer_states"][0]["param_groups"]:
            group["lr"] = 123.0
            del group["initial_lr"]
        torch.save(ckpt, run / "last.ckpt")
    config, path, run_dir = resolve_resume(str(run / "last.ckpt"), load_config("smoke"), ["train.max_steps=44"])
    rates = Rates()
    train(config, resume=path, run_dir=run_dir, callbacks=[rates])
    assert [done for done, _ in rates.rows] == [40, 41, 42, 43]
    for done, rate in rates.rows:
        assert rate == pytest.approx(cosine(done, 44), rel=1e-12), done


def test_split_figures_are_computed_from_one_pair_of_sums() -> None:
    metrics = split_metrics("val")
    metrics.update(torch.tensor(3.0), 4)
    metrics.update(torch.tensor(1.5, dtype=torch.float64), 2)
    loss = 4.5 / 6
    expected = {"val_loss": loss, "val_bpc": loss / LN2, "val_ppl": math.exp(loss), "val_chars": 6.0}
    got = metrics.compute()
    assert got.keys() == expected.keys()
    for name, value in expected.items():  # float32, as Lightning logs numbers, from float64 sums
        assert got[name].dtype == torch.float32 and got[name].item() == torch.tensor(value).item(), name
    assert list(metrics.compute_groups.values()) == [["loss", "bpc", "ppl", "chars"]]
    metrics.reset()
    metrics.update(torch.tensor(2.0), 1)
    assert metrics.compute()["val_loss"].item() == 2.0
