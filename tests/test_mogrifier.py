"""The Mogrifier LSTM: r = 0 is exactly the LSTM, the rounds compute the paper's equations, the config keys
reach the cell, and it trains."""

from __future__ import annotations

import pytest
import torch
from conftest import shakespeare_text
from torch import Tensor

from charlm.config import load_config
from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.tools.compare.plan import resolve_entries
from charlm.util.errors import CharlmError

IN, H, B, T = 5, 8, 3, 7


def mogrifier(rounds: int, rank: int = 0, **kw: object) -> RecurrentLayer:
    options = {"mogrifier_rounds": rounds, "mogrifier_rank": rank}
    return RecurrentLayer("mogrifier", IN, H, cell_options=options, **kw)  # type: ignore[arg-type]


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("path", ["kernel", "autograd", "step"])
def test_rounds_0_equals_nn_lstm_for_the_same_weights(path: str) -> None:
    """float32, a carried state, outputs and final state to 1e-5: nn.LSTM's state_dict loads as it is."""
    torch.manual_seed(0)
    reference = torch.nn.LSTM(IN, H, batch_first=True)
    layer = mogrifier(0)
    layer.load_state_dict(reference.state_dict())
    layer.cell.kernel_on = path == "kernel"
    x, h0, c0 = randn(B, T, IN, seed=1), randn(1, B, H, seed=2), randn(1, B, H, seed=3)
    want, (h, c) = reference(x, (h0, c0))
    if path == "step":
        state: tuple[Tensor, ...] = (h0, c0)
        outs = []
        for t in range(T):
            y, state = layer.step(x[:, t], state)
            outs.append(y)
        got, final = torch.stack(outs, 1), state
    else:
        got, final = layer(x, (h0, c0))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, b in zip(final, (h, c), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cell_mogrifier_with_rounds_0_equals_lstm_to_1e5_for_the_same_weights() -> None:
    """Whole models: ``--cell mogrifier`` with rounds 0 takes charlm's ``lstm`` weights as they are and gives its
    logits, in training (dropout off) and in eval."""
    vocab = Vocab.from_text(shakespeare_text(2000))
    lstm_cfg = load_config("smoke", ["model.cell=lstm"]).model
    mog_cfg = load_config("smoke", ["model.cell=mogrifier", "model.mogrifier_rounds=0"]).model
    torch.manual_seed(0)
    lstm, mog = CharLM(len(vocab), lstm_cfg), CharLM(len(vocab), mog_cfg)
    mog.load_state_dict(lstm.state_dict())
    ids = vocab.encode(shakespeare_text(2000))[: 4 * 50].view(4, 50)
    for mode in (True, False):
        lstm.train(mode), mog.train(mode)
        torch.testing.assert_close(mog(ids).logits, lstm(ids).logits, atol=1e-5, rtol=0)


def sig(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def reference(layer: RecurrentLayer, x: Tensor, state: tuple[Tensor, ...], rounds: int, rank: int) -> Tensor:
    """The paper's equations, step by step (float64): x^i = 2 s(Q^i h^{i-1}) x^{i-2} for odd i,
    h^i = 2 s(R^i x^{i-1}) h^{i-2} for even i, then nn.LSTM's step on the last x and h."""
    p = dict(layer.named_parameters())

    def matrix(name: str) -> Tensor:
        return p[f"{name}_left_l0"] @ p[f"{name}_right_l0"] if rank else p[f"{name}_l0"]

    h, c = state[0][0], state[1][0]
    outs = []
    for t in range(x.shape[1]):
        xt, ht = x[:, t], h
        for i in range(1, rounds + 1):
            if i % 2:
                xt = 2 * sig(ht @ matrix(f"mogrifier_q{i}").t()) * xt
            else:
                ht = 2 * sig(xt @ matrix(f"mogrifier_r{i}").t()) * ht
        a = xt @ p["weight_ih_l0"].t() + p["bias_ih_l0"] + ht @ p["weight_hh_l0"].t() + p["bias_hh_l0"]
        a_i, a_f, a_g, a_o = a.chunk(4, 1)
        c = sig(a_f) * c + sig(a_i) * torch.tanh(a_g)
        h = sig(a_o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1)


@pytest.mark.parametrize(("rounds", "rank"), [(5, 0), (4, 0), (5, 2), (1, 3)])
def test_rounds_compute_the_papers_equations(rounds: int, rank: int) -> None:
    torch.manual_seed(rounds + 10 * rank)
    layer = mogrifier(rounds, rank).double()
    x, state = randn(B, T, IN, seed=4, dtype=torch.float64), (
        randn(1, B, H, seed=5, dtype=torch.float64), randn(1, B, H, seed=6, dtype=torch.float64))
    out, final = layer(x, state)
    want = reference(layer, x, state, rounds, rank)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(final[0][0], want[:, -1], atol=1e-12, rtol=0)
    expected = {f"mogrifier_{'q' if i % 2 else 'r'}{i}" for i in range(1, rounds + 1)}
    extras = {n.removesuffix("_l0") for n, _ in layer.named_parameters() if n.startswith("mogrifier_")}
    if rank:
        assert extras == {f"{e}_{side}" for e in expected for side in ("left", "right")}
        assert layer.mogrifier_q1_left_l0.shape == (IN, rank) and layer.mogrifier_q1_right_l0.shape == (rank, H)
    else:
        assert extras == expected and layer.mogrifier_q1_l0.shape == (IN, H)
        if rounds > 1:
            assert layer.mogrifier_r2_l0.shape == (H, IN)


def test_rounds_change_the_output_and_zero_matrices_give_the_lstm_back() -> None:
    """The same LSTM weights: with the rounds' matrices at zero every 2 s(0) = 1 and the output is the LSTM's;
    as initialised, the rounds change it."""
    torch.manual_seed(1)
    lstm, mog = mogrifier(0), mogrifier(3)
    mog.load_state_dict(lstm.state_dict(), strict=False)
    x = randn(B, T, IN, seed=7)
    want = lstm(x)[0]
    assert (mog(x)[0] - want).abs().max() > 1e-3
    with torch.no_grad():
        for name, p in mog.named_parameters():
            if name.startswith("mogrifier_"):
                p.zero_()
    torch.testing.assert_close(mog(x)[0], want, atol=1e-6, rtol=0)


def test_every_parameter_gets_a_gradient_and_the_smoke_model_trains() -> None:
    """A few AdamW steps of the smoke config on real text: the training loss goes down."""
    text = shakespeare_text(20000)
    vocab = Vocab.from_text(text)
    cfg = load_config("smoke", ["model.cell=mogrifier", "model.mogrifier_rank=8"])
    torch.manual_seed(0)
    model = CharLM(len(vocab), cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    ids = vocab.encode(text)
    n = cfg.data.batch_size * (cfg.data.bptt + 1)
    losses = []
    for step in range(12):
        window = ids[step * n : (step + 1) * n].view(cfg.data.batch_size, -1)
        loss = torch.nn.functional.cross_entropy(model(window[:, :-1]).logits.flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not missing
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


def test_config_keys_are_checked_and_listed_by_compare() -> None:
    for key in ("mogrifier_rounds", "mogrifier_rank"):
        with pytest.raises(CharlmError) as err:
            load_config("smoke", [f"model.{key}=-1"])
        assert str(err.value) == f"config key 'model.{key}' must not be negative, got -1"
    assert [e.cell for e in resolve_entries("lstm,mogrifier", None)] == ["lstm", "mogrifier"]
    cell = RecurrentLayer("mogrifier", IN, H).cell  # no options: the config's defaults
    defaults = load_config("smoke").model
    assert (cell.rounds, cell.rank) == (defaults.mogrifier_rounds, defaults.mogrifier_rank)


@pytest.mark.parametrize(("rounds", "rank"), [(1, 0), (2, 0), (5, 0), (4, 2), (3, 3)])
def test_kernel_equals_autograd_through_the_step(rounds: int, rank: int) -> None:
    """float64, a carried state, weights moved off their init: outputs, final state and the gradient of every
    input and parameter, the hand-written kernel against autograd through :meth:`MogrifierLSTMCell.step`."""
    torch.manual_seed(rounds)
    layer = mogrifier(rounds, rank).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    inputs = (randn(B, T, IN, seed=8, dtype=torch.float64), randn(1, B, H, seed=9, dtype=torch.float64),
              randn(1, B, H, seed=10, dtype=torch.float64))
    weights = randn(B, T, H, seed=11, dtype=torch.float64)
    results, kernels = [], []
    for kernel_on in (True, False):
        layer.cell.kernel_on = kernel_on
        layer.zero_grad()
        x, h, c = (t.clone().requires_grad_() for t in inputs)
        out, (h_T, c_T) = layer(x, (h, c))
        kernels.append(type(out.grad_fn.next_functions[0][0]).__name__)
        ((out * weights).sum() + (h_T**2).sum() + (c_T**3).sum()).backward()
        results.append([out, h_T, c_T, x.grad, h.grad, c.grad, *(p.grad for p in layer.parameters())])
    assert kernels[0] == "MogrifierKernelBackward" and kernels[1] != kernels[0]
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
