"""Every cell computes what its equation says: expected values are computed here, step by step,
straight from the equations in each cell's docstring (not from the library's code). The normalised LSTMs:
``test_cells_normalised.py``."""

from __future__ import annotations

import math

import pytest
import torch
from cell_equations import IN, KERNELS, TOL, H, T, affine, blocks, check, make, rand_inputs, sig, tanh, use_kernel
from torch import Tensor

from charlm.cells.registry import CELLS, cell_names, describe_cells
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.util.errors import CharlmError

# ----------------------------------------------------------------------------------------------
# The LSTM family, one reference loop written from the peephole-LSTM equations
# ----------------------------------------------------------------------------------------------
GATED = {
    # name: (input gate, forget gate, output gate, coupled, g = tanh, h = o*tanh(c), peepholes)
    "lstm": (True, True, True, False, True, True, False),
    "lstm-b": (True, True, True, False, True, True, False),
    "np": (True, True, True, False, True, True, False),
    "peephole": (True, True, True, False, True, True, True),
    "lstm-f": (True, False, True, False, True, True, False),
    "lstm-i": (False, True, True, False, True, True, False),
    "lstm-o": (True, True, False, False, True, True, False),
    "nig": (False, True, True, False, True, True, True),
    "nfg": (True, False, True, False, True, True, True),
    "nog": (True, True, False, False, True, True, True),
    "niaf": (True, True, True, False, False, True, True),
    "noaf": (True, True, True, False, True, False, True),
    "cifg": (True, False, True, True, True, True, True),
}


def gated_reference(layer: RecurrentLayer, x: Tensor, state: tuple[Tensor, ...], flags: tuple[bool, ...]) -> Tensor:
    has_i, has_f, has_o, coupled, g_tanh, out_tanh, peep = flags
    names = [n for n, on in (("i", has_i), ("f", has_f and not coupled), ("g", True), ("o", has_o)) if on]
    W = dict(zip(names, blocks(layer.weight_ih_l0, len(names)), strict=True))
    U = dict(zip(names, blocks(layer.weight_hh_l0, len(names)), strict=True))
    b = dict(zip(names, blocks(layer.bias_ih_l0 + layer.bias_hh_l0, len(names)), strict=True))
    pnames = [n for n in names if n != "g"] if peep else []
    P = dict(zip(pnames, blocks(layer.peephole_l0, len(pnames)), strict=True)) if peep else {}
    h, c = state[0][0], state[1][0]
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]

        def a(n: str, cell: Tensor, xt: Tensor = xt, h: Tensor = h) -> Tensor:
            v = affine(W[n], xt) + affine(U[n], h) + b[n]
            return v + P[n] * cell if n in P else v

        i = sig(a("i", c)) if has_i else torch.ones_like(c)
        f = sig(a("f", c)) if has_f and not coupled else torch.ones_like(c)
        if coupled:
            f = 1.0 - i
        g = tanh(a("g", c)) if g_tanh else a("g", c)
        c = f * c + i * g
        o = sig(a("o", c)) if has_o else torch.ones_like(c)
        h = o * (tanh(c) if out_tanh else c)
        outs.append(h)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
@pytest.mark.parametrize("cell", list(GATED))
def test_gated_variants_follow_their_equations(cell: str, kernel: bool) -> None:
    layer = make(cell)
    layer.cell.kernel_on = kernel
    x, state = rand_inputs(layer)
    check(layer, gated_reference(layer, x, state, GATED[cell]), x, state)


@pytest.mark.parametrize("cell", [*GATED, "fgr", "lstm-ln", "lstm-bn", "gru", "gru-cho", "mut1", "mut2", "mut3"])
def test_kernel_gradients_match_autograd(cell: str) -> None:
    """The hand-written backward through time equals autograd through the step, for every input."""
    layer = make(cell)
    x, state = rand_inputs(layer, steps=6)
    results = []
    for kernel in KERNELS if cell in ("lstm-ln", "lstm-bn") else ("kernel", "autograd"):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        st = tuple(s.clone().requires_grad_() for s in state)
        with use_kernel(layer, kernel):
            out, final = layer(xi, st)
        g = torch.Generator().manual_seed(5)
        loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
        for weight, last in zip((1.7, -0.6, 0.4), final, strict=False):  # h, c and fgr's gates
            loss = loss + weight * (last * torch.randn(last.shape, generator=g, dtype=last.dtype)).sum()
        loss.backward()
        results.append([xi.grad, *(s.grad for s in st), *(p.grad for p in layer.parameters())])
    for got in results[:-1]:
        for a, b in zip(got, results[-1], strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_peephole_with_zero_peepholes_is_lstm() -> None:
    lstm, peep = make("lstm"), make("peephole")
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            getattr(peep, name).copy_(p)
        peep.peephole_l0.zero_()
    x, state = rand_inputs(lstm)
    torch.testing.assert_close(peep(x, state)[0], lstm(x, state)[0], atol=TOL, rtol=0)
    assert RecurrentLayer("peephole", IN, H).peephole_l0.abs().sum() == 0  # fresh peepholes start at zero


def test_np_is_lstm() -> None:
    lstm, np_ = make("lstm"), make("np")
    np_.load_state_dict(lstm.state_dict())
    x, state = rand_inputs(lstm)
    torch.testing.assert_close(np_(x, state)[0], lstm(x, state)[0], atol=TOL, rtol=0)


def test_cifg_ties_forget_to_one_minus_input() -> None:
    layer = make("cifg")
    assert layer.weight_ih_l0.shape[0] == 3 * H  # i, g, o only: no forget block
    x, state = rand_inputs(layer, steps=1)
    c0 = state[1][0]
    _, (_, c1) = layer(x, state)
    Wi, Wg, _ = blocks(layer.weight_ih_l0, 3)
    Ui, Ug, _ = blocks(layer.weight_hh_l0, 3)
    bi, bg, _ = blocks(layer.bias_ih_l0 + layer.bias_hh_l0, 3)
    pi = layer.peephole_l0[:H]
    h0, x0 = state[0][0], x[:, 0]
    i = sig(affine(Wi, x0) + affine(Ui, h0) + bi + pi * c0)
    g = tanh(affine(Wg, x0) + affine(Ug, h0) + bg)
    torch.testing.assert_close(c1[0], (1 - i) * c0 + i * g, atol=TOL, rtol=0)
    # a forget bias b for f = 1 - s(a_i) is an input bias of -b
    fresh = RecurrentLayer("cifg", IN, H, forget_bias=2.0)
    assert torch.all(fresh.bias_ih_l0[:H] == -2.0)


def test_forget_bias_init() -> None:
    assert torch.all(RecurrentLayer("lstm", IN, H, forget_bias=0.0).bias_ih_l0 == 0)
    assert torch.all(RecurrentLayer("lstm", IN, H, forget_bias=1.0).bias_ih_l0[H : 2 * H] == 1.0)
    forced = RecurrentLayer("lstm-b", IN, H, forget_bias=0.0)  # lstm-b forces 1.0
    assert torch.all(forced.bias_ih_l0[H : 2 * H] == 1.0) and torch.all(forced.bias_hh_l0 == 0)
    assert torch.all(forced.bias_ih_l0[:H] == 0) and torch.all(forced.bias_ih_l0[2 * H :] == 0)


def test_per_block_init() -> None:
    layer = RecurrentLayer("lstm", 5, 8, init="kaiming")
    eye = torch.eye(8)
    for blk in blocks_h(layer.weight_hh_l0, 8):  # each recurrent block orthogonal on its own
        torch.testing.assert_close(blk @ blk.t(), eye, atol=1e-5, rtol=0)
    bound = math.sqrt(3.0 / 5)  # He-uniform, fan_in 5, gain 1
    assert layer.weight_ih_l0.abs().max() <= bound
    with pytest.raises(CharlmError, match="unknown init 'bogus'"):
        RecurrentLayer("lstm", 5, 8, init="bogus")


def blocks_h(v: Tensor, h: int) -> list[Tensor]:
    return list(v.reshape(-1, h, v.shape[1]).unbind(0))


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
def test_fgr_gate_recurrence(kernel: bool) -> None:
    layer = make("fgr")
    layer.cell.kernel_on = kernel
    assert layer.num_states == 3 and layer.weight_gg_l0.shape == (3 * H, 3 * H)
    x, state = rand_inputs(layer)
    W = blocks(layer.weight_ih_l0, 4)
    U = blocks(layer.weight_hh_l0, 4)
    b = blocks(layer.bias_ih_l0 + layer.bias_hh_l0, 4)
    p_i, p_f, p_o = blocks(layer.peephole_l0, 3)
    R = layer.weight_gg_l0
    h, c, prev = state[0][0], state[1][0], state[2][0]
    outs = []
    for t in range(T):
        xt = x[:, t]
        rec = blocks(affine(R, prev).t(), 3)  # R [i, f, o]_{t-1}, split per receiving gate
        a = [affine(W[k], xt) + affine(U[k], h) + b[k] for k in range(4)]
        i = sig(a[0] + rec[0].t() + p_i * c)
        f = sig(a[1] + rec[1].t() + p_f * c)
        g = tanh(a[2])
        c = f * c + i * g
        o = sig(a[3] + rec[2].t() + p_o * c)
        h = o * tanh(c)
        prev = torch.cat([i, f, o], 1)
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


# ----------------------------------------------------------------------------------------------
# GRUs, MUTs, simple recurrences
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
def test_gru_cho_resets_before_the_matmul(kernel: bool) -> None:
    layer = make("gru-cho")
    layer.cell.kernel_on = kernel
    x, state = rand_inputs(layer)
    Wr, Wz, Wn = blocks(layer.weight_ih_l0, 3)
    Ur, Uz, Un = blocks(layer.weight_hh_l0, 3)
    bir, biz, bin_ = blocks(layer.bias_ih_l0, 3)
    bhr, bhz, bhn = blocks(layer.bias_hh_l0, 3)
    h = state[0][0]
    outs = []
    for t in range(T):
        xt = x[:, t]
        r = sig(affine(Wr, xt) + bir + affine(Ur, h) + bhr)
        z = sig(affine(Wz, xt) + biz + affine(Uz, h) + bhz)
        n = tanh(affine(Wn, xt) + bin_ + affine(Un, r * h) + bhn)
        h = (1 - z) * n + z * h
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)
    # and it really differs from nn.GRU's form (r outside the matmul) with the same weights
    gru = make("gru")
    gru.load_state_dict(layer.state_dict())
    assert (gru(x, state)[0] - layer(x, state)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
def test_mut1(kernel: bool) -> None:
    layer = make("mut1")
    layer.cell.kernel_on = kernel
    x, state = rand_inputs(layer)
    Wz, Wr, P = blocks(layer.weight_ih_l0, 3)
    bz, br, bp = blocks(layer.bias_ih_l0, 3)
    Ur, Uh = blocks(layer.weight_hh_l0, 2)
    bhr, bh = blocks(layer.bias_hh_l0, 2)
    h = state[0][0]
    outs = []
    for t in range(T):
        xt = x[:, t]
        x_proj = affine(P, xt) + bp  # the documented projection of x to H
        z = sig(affine(Wz, xt) + bz)
        r = sig(affine(Wr, xt) + br + affine(Ur, h) + bhr)
        h = tanh(affine(Uh, r * h) + tanh(x_proj) + bh) * z + h * (1 - z)
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
def test_mut2(kernel: bool) -> None:
    layer = make("mut2")
    layer.cell.kernel_on = kernel
    x, state = rand_inputs(layer)
    Wz, P, Wh = blocks(layer.weight_ih_l0, 3)
    Uz, Ur, Uh = blocks(layer.weight_hh_l0, 3)
    b = [u + v for u, v in zip(blocks(layer.bias_ih_l0, 3), blocks(layer.bias_hh_l0, 3), strict=True)]
    h = state[0][0]
    outs = []
    for t in range(T):
        xt = x[:, t]
        z = sig(affine(Wz, xt) + affine(Uz, h) + b[0])
        r = sig(affine(P, xt) + affine(Ur, h) + b[1])  # "x" is the projection P x (+ its bias)
        h = tanh(affine(Uh, r * h) + affine(Wh, xt) + b[2]) * z + h * (1 - z)
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "autograd"])
def test_mut3(kernel: bool) -> None:
    layer = make("mut3")
    layer.cell.kernel_on = kernel
    x, state = rand_inputs(layer)
    Wz, Wr, Wh = blocks(layer.weight_ih_l0, 3)
    Uz, Ur, Uh = blocks(layer.weight_hh_l0, 3)
    b = [u + v for u, v in zip(blocks(layer.bias_ih_l0, 3), blocks(layer.bias_hh_l0, 3), strict=True)]
    h = state[0][0]
    outs = []
    for t in range(T):
        xt = x[:, t]
        z = sig(affine(Wz, xt) + affine(Uz, tanh(h)) + b[0])
        r = sig(affine(Wr, xt) + affine(Ur, h) + b[1])
        h = tanh(affine(Uh, r * h) + affine(Wh, xt) + b[2]) * z + h * (1 - z)
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


def test_linear_cell() -> None:
    layer = make("linear")
    x, state = rand_inputs(layer)
    A, Bm, b = layer.weight_hh_l0, layer.weight_ih_l0, layer.bias_ih_l0 + layer.bias_hh_l0
    h = state[0][0]
    outs = []
    for t in range(T):
        h = affine(A, h) + affine(Bm, x[:, t]) + b
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


def test_irnn_init_and_relu() -> None:
    fresh = RecurrentLayer("irnn", IN, 5)
    assert torch.equal(fresh.weight_hh_l0, torch.eye(5))
    assert torch.all(fresh.bias_ih_l0 == 0) and torch.all(fresh.bias_hh_l0 == 0)
    layer = make("irnn")
    x, state = rand_inputs(layer)
    h = state[0][0]
    outs = []
    for t in range(T):
        h = torch.clamp(affine(layer.weight_ih_l0, x[:, t]) + affine(layer.weight_hh_l0, h)
                        + layer.bias_ih_l0 + layer.bias_hh_l0, min=0.0)
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


def test_rnn_tanh() -> None:
    layer = make("rnn")
    x, state = rand_inputs(layer)
    h = state[0][0]
    outs = []
    for t in range(T):
        h = tanh(affine(layer.weight_ih_l0, x[:, t]) + affine(layer.weight_hh_l0, h) + layer.bias_ih_l0
                 + layer.bias_hh_l0)
        outs.append(h)
    check(layer, torch.stack(outs, 1), x, state)


# ----------------------------------------------------------------------------------------------
# step() == forward(), the registry
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", list(CELLS))
def test_step_equals_forward(cell: str) -> None:
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, IN, H).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, state = rand_inputs(layer, steps=6)
    if cell == "lstm-bn":  # collect per-step statistics over 3 steps, then run past them
        layer.train()
        layer(torch.randn(5, 3, IN, dtype=torch.float64))
    layer.eval()
    out, final = layer(x, state)
    st = state
    for t in range(x.shape[1]):
        y, st = layer.step(x[:, t], st if t else state, t=None if t else 0)
        torch.testing.assert_close(y, out[:, t], atol=1e-12, rtol=0)
    for a, b in zip(st, final, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_registry() -> None:
    expected = {
        "rnn", "irnn", "lstm", "peephole", "gru", "gru-cho", "lstm-ln", "lstm-bn", "linear", "lstm-f", "lstm-i",
        "lstm-o", "lstm-b", "mut1", "mut2", "mut3", "nig", "nfg", "nog", "niaf", "noaf", "np", "cifg", "fgr",
        "mogrifier", "mingru", "minlstm", "slstm",
    }
    assert set(cell_names()) == expected == set(CELLS)
    for name, summary in describe_cells():
        spec = CELLS[name]
        assert spec.name == name and summary == spec.summary and "\n" not in summary and spec.paper
        layer = RecurrentLayer(name, IN, H)
        assert spec.num_states == layer.num_states == len(layer.cell.state_names) == len(layer.cell.state_sizes())
        assert layer.cell.state_names[0] == "h"
        doc = type(layer.cell).__doc__ or ""
        assert "=" in doc and any(str(year) in doc for year in range(1950, 2025)), name  # equations + paper


def test_unknown_cell_message() -> None:
    with pytest.raises(CharlmError) as err:
        RecurrentLayer("lstmm", IN, H)
    assert str(err.value) == f"unknown cell 'lstmm'; valid cells: {', '.join(sorted(CELLS))}"
