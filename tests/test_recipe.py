"""The AWD-LSTM recipe wired into training: NT-ASGD, variable-length BPTT, every regularizer on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from charlm.config import load_config
from charlm.lightning_module import CharLMModule
from charlm.train import train

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Record(L.Callback):
    """Keeps (step, lr, window length, optimizer class) of every training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int, str]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        group = optimizer.param_groups[0]
        self.rows.append((trainer.global_step, group["lr"], pl_module.last_window, type(optimizer).__name__))


def test_ntasgd_switches_to_averaged_sgd_when_validation_stops_improving(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([3.0, 2.0, 2.5, 3.5, 1.0, 0.9, 0.8, 0.7])  # nonmono=1: 3.5 > min([3.0]) -> switch at eval 4
    original = CharLMModule._log_split

    def fake_log_split(self: CharLMModule, split: str, metric: Any) -> float:
        original(self, split, metric)
        return next(scripted)

    monkeypatch.setattr(CharLMModule, "_log_split", fake_log_split)
    cfg = load_config("smoke", ["optim.optimizer=ntasgd", "optim.lr=1.0", "optim.nonmono=1",
                                "train.val_every_steps=5", "train.max_steps=30", f"data.path={corpus_file}",
                                f"train.out={tmp_path}", "train.name=nt", "sample.enabled=false"])
    result = train(cfg)
    ckpt = torch.load(result.run_dir / "last.ckpt", weights_only=True)
    assert ckpt["ntasgd"]["switched_at"] == 3  # the 4th validation (index 3) triggered it
    assert ckpt["ntasgd"]["history"][:4] == [3.0, 2.0, 2.5, 3.5]
    assert "ax" in next(iter(ckpt["optimizer_states"][0]["state"].values()))  # ASGD keeps the average
    rows = (result.run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    col = header.index("ntasgd_switched")
    flags = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
    assert flags[:3] == [0.0, 0.0, 0.0] and flags[3] == 1.0


def test_variable_bptt_scales_the_learning_rate_by_window_length(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("smoke", ["data.variable_bptt=true", "data.bptt=20", "optim.schedule=constant",
                                "optim.warmup_steps=0", "optim.lr=0.01", "train.max_steps=25",
                                f"data.path={corpus_file}", f"train.out={tmp_path}", "sample.enabled=false"])
    from charlm import train as train_mod

    record = Record()
    original = train_mod.build_trainer
    monkeypatch.setattr(train_mod, "build_trainer",
                        lambda c, d, extra_callbacks=None: original(c, d, extra_callbacks=[record]))
    train(cfg)
    lengths = {length for _, _, length, _ in record.rows}
    assert len(lengths) > 3  # the windows really vary
    for _, lr, length, _ in record.rows:
        assert lr == pytest.approx(0.01 * length / 20)


@pytest.mark.parametrize("variational", [False, True])
def test_every_regularizer_on_trains_and_evaluates_deterministically(variational: bool) -> None:
    cfg = load_config("smoke", ["model.dropout=0.3", "model.dropouth=0.3", "model.dropouti=0.2",
                                "model.dropoute=0.1", "model.weight_drop=0.4", "model.layer_norm=true",
                                f"model.weight_drop_variational={str(variational).lower()}",
                                "optim.alpha=2", "optim.beta=1"])
    torch.manual_seed(0)
    module = CharLMModule(cfg.to_dict(), "abcdefghij")
    x = torch.randint(0, 10, (4, 16))
    y = torch.roll(x, -1, 1).reshape(-1)

    def eval_loss() -> float:
        module.eval()
        with torch.no_grad():
            value = torch.nn.functional.cross_entropy(module.model(x).logits.reshape(-1, 10), y).item()
        module.train()
        return value

    before = eval_loss()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(module.model(x).logits.reshape(-1, 10), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < before - 0.4
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model(x).logits, module.model(x).logits, rtol=0, atol=0)
    module.train()
    with torch.no_grad():
        assert not torch.equal(module.model(x).logits, module.model(x).logits)  # dropout is live in training


def test_ar_tar_enter_the_training_loss() -> None:
    from charlm.regularizers import ar_penalty, tar_penalty
    from charlm.streams import Batch

    cfg = load_config("smoke", ["optim.alpha=2", "optim.beta=3"])
    torch.manual_seed(0)
    module = CharLMModule(cfg.to_dict(), "abcdefgh")
    module.eval()  # no dropout: the same forward twice
    x, y = torch.randint(0, 8, (2, 12)), torch.randint(0, 8, (2, 12))
    with pytest.warns(UserWarning):
        total = module.training_step(Batch(x, y), 0)
    out = module.model(x)
    nll = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 8), y.reshape(-1))
    expected = nll + ar_penalty(out.dropped_last, 2.0) + tar_penalty(out.raw_last, 3.0)
    assert total is not None
    torch.testing.assert_close(total, expected)
    assert float(expected - nll) > 0
