"""Tests for the NT-ASGD controller and averaged-weight helpers (Merity et al. 2017)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from charlm.config import load_config
from charlm.training.lightning_module import CharLMModule
from charlm.training.ntasgd import (
    NTASGD,
    asgd_from,
    averaged_weights,
    nonmono_triggered,
    restore_raw_weights,
    swap_in_averages,
)


def _reference(loss: float, hist: list[float], nonmono: int) -> bool:
    """The AWD-LSTM condition written out longhand (Merity et al. 2017)."""
    if len(hist) <= nonmono:
        return False
    return any(loss > old for old in hist[: len(hist) - nonmono])  # worse than some old loss


def test_switches_when_and_only_when_condition_holds() -> None:
    """On every small history the controller agrees with the paper's test (Merity et al. 2017)."""
    values = [1.0, 2.0, 3.0]
    for nonmono in (1, 2, 3):
        for length in range(1, 7):
            for seq in itertools.product(values, repeat=length):
                ctl = NTASGD(nonmono)
                fired = [ctl.step(v) for v in seq]
                expected = [_reference(seq[i], list(seq[:i]), nonmono) for i in range(length)]
                first = expected.index(True) if True in expected else -1
                assert fired == [i == first for i in range(length)], (nonmono, seq)
                assert ctl.switched_at == first
                assert ctl.switched == (first >= 0)
                for i in range(length):
                    assert nonmono_triggered(seq[i], seq[:i], nonmono) == expected[i]


def test_worked_example() -> None:
    """nonmono=2: a loss above the best from more than two evals back triggers (Merity et al. 2017)."""
    ctl = NTASGD(nonmono=2)
    assert [ctl.step(v) for v in (5.0, 4.0, 3.0, 2.9, 2.95)] == [False] * 5  # never above min(hist[:-2])
    # history (5, 4, 3, 2.9, 2.95): next loss 3.5 vs min(5, 4, 3) = 3 -> switch
    assert ctl.step(torch.tensor(3.5)) is True
    assert ctl.switched_at == 5
    assert ctl.step(10.0) is False  # only once
    assert ctl.history == [5.0, 4.0, 3.0, 2.9, 2.95, 3.5, 10.0]


def test_no_switch_while_improving_or_too_short() -> None:
    """Monotone improvement or too few evaluations never switch (Merity et al. 2017)."""
    ctl = NTASGD(nonmono=5)
    assert not any(ctl.step(10.0 - i) for i in range(50))
    ctl = NTASGD(nonmono=5)
    assert not any(ctl.step(v) for v in (1.0, 9.0, 9.0, 9.0, 9.0, 9.0))  # len(hist) <= 5 each time
    assert ctl.step(9.0) is True
    with pytest.raises(ValueError, match=r"^nonmono must be >= 1, got 0$"):
        NTASGD(0)
    with pytest.raises(ValueError, match=r"^nonmono must be >= 1, got 0$"):
        nonmono_triggered(1.0, [2.0, 3.0], 0)


def test_nonmono_defaults_to_five() -> None:
    """``NTASGD()`` waits out AWD-LSTM's 5 validations: a worse loss switches only once more than 5 are
    recorded (Merity et al. 2017)."""
    ctl = NTASGD()
    assert repr(ctl) == "NTASGD(nonmono=5, evals=0, switched_at=-1)"
    assert [ctl.step(v) for v in (1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)] == [False] * 6 + [True]
    assert repr(ctl) == "NTASGD(nonmono=5, evals=7, switched_at=6)"


def test_state_dict_round_trip(tmp_path: Path) -> None:
    """State is primitive-only and survives a weights_only save/load (Merity et al. 2017)."""
    ctl = NTASGD(nonmono=2)
    for v in (3.0, 2.0, 1.0, 1.5):
        ctl.step(v)
    state = ctl.state_dict()
    assert all(isinstance(v, (int, float, bool, list)) for v in state.values())
    path = tmp_path / "ctl.pt"
    torch.save({"ntasgd": state}, path)
    loaded = torch.load(path, weights_only=True)["ntasgd"]
    fresh = NTASGD(nonmono=9)
    fresh.load_state_dict(loaded)
    assert fresh.state_dict() == state
    # both continue identically: 2.5 > min(3, 2) triggers in each
    assert fresh.step(2.5) is ctl.step(2.5) is True
    assert fresh.state_dict() == ctl.state_dict()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, snapshots: list[torch.Tensor]) -> None:
    """A few deterministic steps on a toy regression, recording the weight after each (Merity et al. 2017)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        snapshots.append(model.weight.detach().clone())


@pytest.mark.parametrize("foreach", [False, True])
def test_asgd_average_is_mean_of_iterates(foreach: bool) -> None:
    """torch's ASGD ``ax`` is the mean of the iterates from its second step on (Merity et al. 2017)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.ASGD(model.parameters(), lr=0.05, t0=0, lambd=0.0, foreach=foreach)
    snaps: list[torch.Tensor] = []
    _train(model, opt, 6, snaps)
    expected = torch.stack(snaps[1:]).mean(dim=0)
    assert torch.allclose(opt.state[model.weight]["ax"], expected, atol=1e-6)


def test_asgd_from() -> None:
    """The builder gives ASGD with t0=0, lambd=0 and the requested lr / weight decay (Merity et al. 2017)."""
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(
        [{"params": [model.weight], "weight_decay": 1e-4}, {"params": [model.bias]}], lr=5.0
    )
    asgd = asgd_from(sgd)
    assert isinstance(asgd, torch.optim.ASGD)
    assert [g["lr"] for g in asgd.param_groups] == [5.0, 5.0]
    assert [g["weight_decay"] for g in asgd.param_groups] == [1e-4, 0.0]
    assert asgd.param_groups[0]["params"][0] is model.weight
    assert all(g["t0"] == 0 and g["lambd"] == 0.0 for g in asgd.param_groups)
    assert [g["lr"] for g in asgd_from(sgd, lr=2.0).param_groups] == [2.0, 2.0]
    extra = nn.Parameter(torch.zeros(2))
    asgd.add_param_group({"params": [extra]})  # a group added later runs at the same rate, without decay
    assert asgd.param_groups[-1]["lr"] == 5.0 and asgd.param_groups[-1]["weight_decay"] == 0.0


def test_asgd_from_an_optimizer_without_weight_decay() -> None:
    """A group with no ``weight_decay`` at all (an optimizer that has no such option) gets none
    (Merity et al. 2017)."""
    model = nn.Linear(3, 2)
    plain = torch.optim.Optimizer(model.parameters(), {"lr": 0.5})
    asgd = asgd_from(plain)
    assert [(g["lr"], g["weight_decay"]) for g in asgd.param_groups] == [(0.5, 0.0)]


def _has_averages(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` holds ASGD running averages to swap in (Merity et al. 2017)."""
    return any("ax" in state for state in optimizer.state.values())


def test_averaged_weights_swap_and_exact_restore() -> None:
    """The model holds ``ax`` inside the context, raw weights bit for bit after (Merity et al. 2017)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    weight_obj, weight_ptr = model.weight, model.weight.data_ptr()
    opt = asgd_from(torch.optim.SGD(model.parameters(), lr=0.05))
    assert not _has_averages(opt)
    _train(model, opt, 5, [])
    assert _has_averages(opt)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ax_w = opt.state[model.weight]["ax"].clone()
    assert not torch.equal(ax_w, raw["weight"])
    with averaged_weights(opt) as backup:
        assert torch.equal(model.weight, ax_w)
        assert torch.equal(model.bias, opt.state[model.bias]["ax"])
        assert [p for p, _ in backup] == [model.weight, model.bias]  # the raw copies, e.g. for a checkpoint
        assert torch.equal(backup[0][1], raw["weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])
    assert model.weight is weight_obj and model.weight.data_ptr() == weight_ptr  # swapped in place

    # restored even when the body raises
    with pytest.raises(RuntimeError), averaged_weights(opt):
        raise RuntimeError("boom")
    assert torch.equal(model.weight, raw["weight"])

    # the two halves of the context
    backup = swap_in_averages(opt)
    assert torch.equal(model.weight, ax_w)
    restore_raw_weights(backup)
    assert torch.equal(model.weight, raw["weight"])


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_a_parameter_listed_twice_is_swapped_and_restored_once() -> None:
    """A weight that appears twice in a group (torch warns, and allows it) is backed up once: restoring puts
    the raw weight back, not the average that a second backup would have copied (Merity et al. 2017)."""
    w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    opt = torch.optim.ASGD([w, w], lr=0.1, t0=0, lambd=0.0)
    for grad in (torch.tensor([1.0, 0.0, -1.0]), torch.tensor([0.5, 0.5, 0.5]), torch.tensor([-2.0, 1.0, 0.0])):
        w.grad = grad
        opt.step()
    raw, ax = w.detach().clone(), opt.state[w]["ax"].clone()
    assert not torch.equal(raw, ax)
    with averaged_weights(opt) as backup:
        assert len(backup) == 1
        assert torch.equal(w, ax)
    assert torch.equal(w, raw)


def test_averaged_weights_noop_without_asgd() -> None:
    """With a non-ASGD optimizer the context leaves the weights alone (Merity et al. 2017)."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.clone()
    with averaged_weights(opt):
        assert torch.equal(model.weight, before)
    assert torch.equal(model.weight, before)


class AppliedRates(L.Callback):
    """(steps done, the rate the optimizer step really applied, window length, optimizer class) of every step,
    read from the weights: with no momentum, weight decay or clipping an SGD / ASGD (lambd = 0) step moves a
    weight by -rate * gradient, so the rate is the move of the decoder bias's element with the largest
    gradient over that gradient (not the group's ``lr``, which ASGD need not apply)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int, str]] = []
        self._window = 0
        self._before: tuple[int, torch.Tensor, float, str] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._window = batch.x.size(1)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        bias = pl_module.model.decoder.bias  # type: ignore[union-attr]
        assert bias.grad is not None
        i = int(bias.grad.abs().argmax())
        self._before = (i, bias.detach().clone(), float(bias.grad[i]), type(optimizer).__name__)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        assert self._before is not None
        i, before, grad, name = self._before
        after = pl_module.model.decoder.bias.detach()  # type: ignore[union-attr]
        self.rows.append((trainer.global_step - 1, float(before[i] - after[i]) / grad, self._window, name))
        self._before = None


def ntasgd_run(corpus: Path, out: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> tuple[Any, AppliedRates]:
    """A smoke run with NT-ASGD (nonmono=1), validations every 5 steps whose losses are scripted so that the
    4th (after step 20) switches to averaged SGD; SGD with nothing that changes a step but the rate."""
    from charlm.training import fit as train_module

    scripted = iter([3.0, 2.0, 2.5, 3.5, 1.0, 0.9])  # nonmono=1: 3.5 > min([3.0]) switches after step 20
    monkeypatch.setattr(CharLMModule, "_val_loss", lambda self: next(scripted))
    record = AppliedRates()
    cfg = load_config("smoke", ["optim.optimizer=ntasgd", "optim.nonmono=1", "optim.weight_decay=0", "optim.clip=0",
                                "train.val_every_steps=5", "train.max_steps=30", f"data.path={corpus}",
                                f"train.out={out}", "train.name=nt", "sample.enabled=false", *overrides])
    return train_module.train(cfg, callbacks=[record]), record


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cosine_rate_is_continuous_at_the_switch_and_held_after(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Averaged SGD goes on at the rate the schedule had reached at the switch, held constant (AWD-LSTM
    averages at a constant rate); it never jumps back to the base rate. The rates are those the steps applied."""
    lr, min_lr, steps = 1.0, 0.01, 30
    result, record = ntasgd_run(corpus_file, tmp_path, monkeypatch, f"optim.lr={lr}", f"optim.min_lr={min_lr}",
                                "optim.schedule=cosine", "optim.warmup_steps=0")

    def cosine(done: int) -> float:
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * done / steps))

    assert [(done, name) for done, _, _, name in record.rows] == [
        (done, "SGD" if done < 20 else "ASGD") for done in range(steps)]
    for done, rate, _, _ in record.rows:
        assert rate == pytest.approx(cosine(min(done, 20)), rel=2e-3), done
    ckpt = torch.load(result.run_dir / "last.ckpt", weights_only=True)
    assert ckpt["ntasgd"]["switched_at"] == 3
    assert ckpt["ntasgd_lr_at_switch"] == pytest.approx(cosine(20))  # kept for a resume


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_each_step_applies_its_own_windows_rate_after_the_switch(
        corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Variable-length BPTT scales a step's rate by its window's length / bptt, before and after the switch
    to averaged SGD: the rate each step applied is its own window's (torch's ASGD would apply the one its
    previous step saved, the previous window's)."""
    _, record = ntasgd_run(corpus_file, tmp_path, monkeypatch, "optim.lr=0.5", "optim.schedule=constant",
                           "optim.warmup_steps=0", "data.variable_bptt=true", "data.bptt=20")
    assert {name for _, _, _, name in record.rows} == {"SGD", "ASGD"}
    assert len({window for _, _, window, _ in record.rows[20:]}) > 3  # the windows do vary after the switch
    for done, rate, window, _ in record.rows:
        assert rate == pytest.approx(0.5 * window / 20, rel=2e-3), done


def test_rate_at_the_switch_survives_a_checkpoint() -> None:
    """A resumed module holds the saved rate; a checkpoint from before that rate was kept resumes at the
    base rate, as its run had averaged."""
    cfg = load_config("smoke", ["optim.optimizer=ntasgd", "optim.lr=2.0", "optim.nonmono=1"]).to_dict()
    module = CharLMModule(cfg, "abc")
    assert [module.ntasgd.step(loss) for loss in (3.0, 2.0, 3.5)] == [False, False, True]
    module._lr_at_switch = 0.375
    checkpoint: dict[str, Any] = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["ntasgd_lr_at_switch"] == 0.375
    resumed = CharLMModule(cfg, "abc")
    resumed.on_load_checkpoint(checkpoint)
    assert resumed.ntasgd.switched and resumed.learning_rate() == 0.375
    del checkpoint["ntasgd_lr_at_switch"]
    old = CharLMModule(cfg, "abc")
    old.on_load_checkpoint(checkpoint)
    assert old.ntasgd.switched and old.learning_rate() == 2.0


def test_the_module_swaps_the_averages_in_one_place() -> None:
    """``CharLMModule.averaged_weights`` (used by validation and by the final scoring): inside, the model
    holds the averages and a checkpoint keeps the raw weights to resume from; after, the raw weights."""
    from types import SimpleNamespace

    cfg = load_config("smoke", ["optim.optimizer=ntasgd", "optim.nonmono=1"]).to_dict()
    module = CharLMModule(cfg, "abc")
    torch.manual_seed(0)
    opt = asgd_from(torch.optim.SGD(module.parameters(), lr=0.1))
    for _ in range(3):
        opt.zero_grad()
        sum((p - 1).pow(2).sum() * torch.rand(()) for p in module.parameters()).backward()
        opt.step()
    module._trainer = SimpleNamespace(optimizers=[opt], global_step=3, world_size=1)  # type: ignore[assignment]
    raw = {name: p.detach().clone() for name, p in module.named_parameters()}
    with module.averaged_weights():  # before the switch: nothing swapped
        assert all(torch.equal(p, raw[name]) for name, p in module.named_parameters())
    assert [module.ntasgd.step(loss) for loss in (3.0, 2.0, 3.5)] == [False, False, True]
    with module.averaged_weights():
        for p in module.parameters():
            assert torch.equal(p, opt.state[p]["ax"])
        checkpoint: dict[str, Any] = {"state_dict": {k: v.clone() for k, v in module.state_dict().items()}}
        module.on_save_checkpoint(checkpoint)
    assert checkpoint["raw_weights"].keys() == raw.keys()
    for name, p in module.named_parameters():
        assert torch.equal(checkpoint["raw_weights"][name], raw[name]) and torch.equal(p, raw[name])
        assert not torch.equal(checkpoint["state_dict"][name], raw[name])  # the averages
    module.on_save_checkpoint(outside := {"state_dict": module.state_dict()})
    assert "raw_weights" not in outside
