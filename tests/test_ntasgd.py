"""Tests for the NT-ASGD controller and averaged-weight helpers (Merity et al. 2017)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from charlm.ntasgd import (
    NTASGD,
    asgd_from,
    averaged_state_dict,
    averaged_weights,
    has_averages,
    make_asgd,
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
                    assert ctl.should_switch(seq[: i + 1]) == expected[i]
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
    assert ctl.best == 2.9


def test_no_switch_while_improving_or_too_short() -> None:
    """Monotone improvement or too few evaluations never switch (Merity et al. 2017)."""
    ctl = NTASGD(nonmono=5)
    assert not any(ctl.step(10.0 - i) for i in range(50))
    ctl = NTASGD(nonmono=5)
    assert not any(ctl.step(v) for v in (1.0, 9.0, 9.0, 9.0, 9.0, 9.0))  # len(hist) <= 5 each time
    assert ctl.step(9.0) is True
    with pytest.raises(ValueError):
        NTASGD(0)


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


def test_make_asgd_and_asgd_from() -> None:
    """The builders give ASGD with t0=0, lambd=0 and the requested lr / weight decay (Merity et al. 2017)."""
    model = nn.Linear(3, 2)
    opt = make_asgd(model.parameters(), lr=30.0, weight_decay=1.2e-6)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.ASGD)
    assert (group["lr"], group["t0"], group["lambd"], group["weight_decay"]) == (30.0, 0, 0.0, 1.2e-6)
    sgd = torch.optim.SGD(
        [{"params": [model.weight], "weight_decay": 1e-4}, {"params": [model.bias]}], lr=5.0
    )
    asgd = asgd_from(sgd)
    assert [g["lr"] for g in asgd.param_groups] == [5.0, 5.0]
    assert [g["weight_decay"] for g in asgd.param_groups] == [1e-4, 0.0]
    assert asgd.param_groups[0]["params"][0] is model.weight
    assert all(g["t0"] == 0 and g["lambd"] == 0.0 for g in asgd.param_groups)
    assert [g["lr"] for g in asgd_from(sgd, lr=2.0).param_groups] == [2.0, 2.0]


def test_averaged_weights_swap_and_exact_restore() -> None:
    """The model holds ``ax`` inside the context, raw weights bit for bit after (Merity et al. 2017)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    weight_obj, weight_ptr = model.weight, model.weight.data_ptr()
    opt = make_asgd(model.parameters(), lr=0.05)
    assert not has_averages(opt)
    _train(model, opt, 5, [])
    assert has_averages(opt)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ax_w = opt.state[model.weight]["ax"].clone()
    assert not torch.equal(ax_w, raw["weight"])
    with averaged_weights(opt):
        assert torch.equal(model.weight, ax_w)
        assert torch.equal(model.bias, opt.state[model.bias]["ax"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])
    assert model.weight is weight_obj and model.weight.data_ptr() == weight_ptr  # swapped in place

    # restored even when the body raises
    with pytest.raises(RuntimeError), averaged_weights(opt):
        raise RuntimeError("boom")
    assert torch.equal(model.weight, raw["weight"])

    # split form for hook-based callers, and the checkpoint helper
    backup = swap_in_averages(opt)
    assert torch.equal(model.weight, ax_w)
    restore_raw_weights(backup)
    assert torch.equal(model.weight, raw["weight"])
    sd = averaged_state_dict(model, opt)
    assert torch.equal(sd["weight"], ax_w)
    assert torch.equal(model.weight, raw["weight"])


def test_averaged_weights_noop_without_asgd() -> None:
    """With a non-ASGD optimizer the context leaves the weights alone (Merity et al. 2017)."""
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.weight.clone()
    with averaged_weights(opt):
        assert torch.equal(model.weight, before)
    assert torch.equal(model.weight, before)
