"""The AWD-LSTM recipe wired into training: NT-ASGD, variable-length BPTT, every regularizer on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from charlm.config import load_config
from charlm.data.streams import Batch
from charlm.training.fit import train
from charlm.training.lightning_module import CharLMModule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Record(L.Callback):
    """Keeps (step, lr, window length, optimizer class) of every training batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int, str]] = []
        self._window = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._window = batch.x.size(1)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        group = optimizer.param_groups[0]
        self.rows.append((trainer.global_step, group["lr"], self._window, type(optimizer).__name__))


def test_ntasgd_switches_to_averaged_sgd_when_validation_stops_improving(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = iter([3.0, 2.0, 2.5, 3.5, 1.0, 0.9, 0.8, 0.7])  # nonmono=1: 3.5 > min([3.0]) -> switch at eval 4
    monkeypatch.setattr(CharLMModule, "_val_loss", lambda self: next(scripted))
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
    from charlm.training import fit as train_mod

    record = Record()
    original = train_mod.build_trainer
    monkeypatch.setattr(train_mod, "build_trainer",
                        lambda c, d, extra_callbacks=None: original(c, d, extra_callbacks=[record]))
    train(cfg)
    lengths = {length for _, _, length, _ in record.rows}
    assert len(lengths) > 3  # the windows really vary
    for _, lr, length, _ in record.rows:
        assert lr == pytest.approx(0.01 * length / 20)


VOCAB = "abcdefghij"
ALL_OFF = ("model.dropout=0", "model.dropouth=0", "model.dropouti=0", "model.dropoute=0", "model.weight_drop=0",
           "optim.alpha=0", "optim.beta=0")
DROPOUTS = ("model.dropout=0.3", "model.dropouth=0.3", "model.dropouti=0.2", "model.dropoute=0.2",
            "model.weight_drop=0.4")


def _module(*overrides: str, like: CharLMModule | None = None) -> CharLMModule:
    """A smoke-sized module, every regularizer off but ``overrides``; with ``like``'s weights if given."""
    torch.manual_seed(0)
    module = CharLMModule(load_config("smoke", [*ALL_OFF, *overrides]).to_dict(), VOCAB)
    if like is not None:
        module.load_state_dict(like.state_dict())
    return module


def _batch() -> Batch:
    torch.manual_seed(3)
    x = torch.randint(0, len(VOCAB), (4, 16))
    return Batch(x, torch.roll(x, -1, 1))


@pytest.mark.parametrize("knobs", ["model.dropout=0.5", "model.dropouth=0.5", "model.dropouti=0.5",
                                   "model.dropoute=0.5", "model.weight_drop=0.5",
                                   "model.weight_drop=0.5 model.weight_drop_variational=true"])
def test_each_regularizer_acts_in_training_and_eval_uses_the_raw_weights(knobs: str) -> None:
    """Each dropout and weight drop changes the training forward; eval equals the same weights with none."""
    regularized = _module(*knobs.split())
    plain = _module(like=regularized)
    x = _batch().x
    with torch.no_grad():
        reference = plain.eval().model(x).logits
        assert torch.equal(plain.train().model(x).logits, reference)  # so a difference below is the knob's
        assert not torch.equal(regularized.train().model(x).logits, reference)
        torch.testing.assert_close(regularized.eval().model(x).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("variational", [False, True])
def test_ar_tar_enter_the_training_loss_and_its_gradient(variational: bool) -> None:
    """AR on the dropped last-layer output, TAR on the raw one (Merity et al. 2017), every dropout on."""
    regs = (*DROPOUTS, f"model.weight_drop_variational={str(variational).lower()}", "model.layer_norm=true")
    module = _module(*regs, "optim.alpha=2", "optim.beta=3")
    without = _module(*regs, like=module)
    batch = _batch()
    params = list(module.model.parameters())

    def loss_and_grads(m: CharLMModule) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        torch.manual_seed(1)  # the same dropout masks for every forward below
        loss = m.train().training_step(batch, 0)
        assert loss is not None
        return loss, torch.autograd.grad(loss, list(m.model.parameters()))

    total, grads = loss_and_grads(module)
    nll_only, grads_without = loss_and_grads(without)
    torch.manual_seed(1)
    out = module.model(batch.x)
    nll = torch.nn.functional.cross_entropy(out.logits.reshape(-1, len(VOCAB)), batch.y.reshape(-1))
    dropped, raw = out.dropped_last, out.raw_last
    assert not torch.equal(dropped, raw)  # the dropout is live, so AR and TAR on the wrong output would show
    penalties = 2 * dropped.pow(2).mean() + 3 * (raw[:, 1:] - raw[:, :-1]).pow(2).mean()
    torch.testing.assert_close(nll_only, nll)
    torch.testing.assert_close(total, nll + penalties)
    penalty_grads = torch.autograd.grad(penalties, params, allow_unused=True)
    assert max(float(g.abs().max()) for g in penalty_grads if g is not None) > 1e-3
    for g, g0, gp in zip(grads, grads_without, penalty_grads, strict=True):
        torch.testing.assert_close(g, g0 if gp is None else g0 + gp)


@pytest.mark.parametrize("variational", [False, True])
def test_every_regularizer_on_still_trains_every_weight(variational: bool) -> None:
    """Every dropout, weight drop, AR and TAR on, through training_step: the loss falls, every weight moves."""
    module = _module(*DROPOUTS, f"model.weight_drop_variational={str(variational).lower()}",
                     "optim.alpha=2", "optim.beta=1", "optim.weight_decay=0",  # only gradients move weights
                     "optim.warmup_steps=0")  # no Trainer counts the steps here: the full rate from the start
    batch = _batch()

    def eval_loss() -> float:
        with torch.no_grad():
            logits = module.eval().model(batch.x).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, len(VOCAB)), batch.y.reshape(-1)).item()

    before = eval_loss()
    start = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    for _ in range(40):
        loss = module.training_step(batch, 0)
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < before - 0.4
    for name, p in module.model.named_parameters():
        assert not torch.equal(p, start[name]), name
