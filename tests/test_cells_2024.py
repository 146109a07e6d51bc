"""minGRU, minLSTM (Feng et al. 2024) and sLSTM (Beck et al. 2024): each against a plain step-by-step reference
written here from the papers' equations (not from the library's code), the parallel scan against the sequential
step, the state carried across windows, the sLSTM's stabiliser on inputs whose exp overflows, and weight drop on
the one matrix the min cells have."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import invoke_as_printed as invoke
from conftest import smoke_args
from torch import Tensor

from charlm.cells.min_rnn import SCAN_CHUNK
from charlm.model.checkpoint import load_model
from charlm.model.recurrent_layer import RecurrentLayer
from charlm.model.regularizers import drop_weight

B, IN, H = 3, 5, 7
WINDOW = 128


def sig(v: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-v))


def g_ref(v: Tensor) -> Tensor:
    """The paper's g: v + 1/2 for v >= 0, sigmoid(v) below."""
    return torch.where(v >= 0, v + 0.5, sig(v))


def projected(layer: RecurrentLayer, x: Tensor) -> Tensor:
    """W x + b of every step, (B, T, K), from the raw parameters."""
    return x @ layer.weight_ih_l0.t() + layer.bias_ih_l0


def min_reference(cell: str, layer: RecurrentLayer, x: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """minGRU / minLSTM one step at a time, in linear space, straight from the paper's equations."""
    xw = projected(layer, x)
    h, outs = h0, []
    for t in range(x.shape[1]):
        a = xw[:, t]
        if cell == "mingru":
            z = sig(a[:, :H])
            h = (1 - z) * h + z * g_ref(a[:, H:])
        else:
            f, i = sig(a[:, :H]), sig(a[:, H : 2 * H])
            h = f / (f + i) * h + i / (f + i) * g_ref(a[:, 2 * H :])
        outs.append(h)
    return torch.stack(outs, 1), h


def slstm_reference(layer: RecurrentLayer, x: Tensor, shift: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """sLSTM from a zero state without the stabiliser: i = exp(a_i), f = s(a_f); every h, and the last c and n.

    ``shift`` multiplies every input gate by exp(-shift), for inputs whose exp(a_i) overflows float64: from a zero
    state c and n are then both exp(-shift) times the true ones and h, their ratio, is exactly the same."""
    xw = x @ layer.weight_ih_l0.t() + layer.bias_ih_l0 + layer.bias_hh_l0
    h = c = n = torch.zeros(x.shape[0], H, dtype=x.dtype)
    outs = []
    for t in range(x.shape[1]):
        a = xw[:, t] + h @ layer.weight_hh_l0.t()
        i, f = torch.exp(a[:, :H] - shift), sig(a[:, H : 2 * H])
        z, o = torch.tanh(a[:, 2 * H : 3 * H]), sig(a[:, 3 * H :])
        c = f * c + i * z
        n = f * n + i
        h = o * c / n
        outs.append(h)
    return torch.stack(outs, 1), c, n


def layer_of(cell: str, dtype: torch.dtype = torch.float64, scale: float = 0.5, seed: int = 0) -> RecurrentLayer:
    """A layer in eval mode with every weight moved off its initialisation (biases too)."""
    torch.manual_seed(seed)
    layer = RecurrentLayer(cell, IN, H).to(dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def stepped(layer: RecurrentLayer, x: Tensor, state: tuple[Tensor, ...] | None = None) -> tuple[Tensor, tuple]:
    """The sequential form: ``RecurrentLayer.step`` (the cell's ``step``, as sampling runs it) over every step."""
    outs = []
    for t in range(x.shape[1]):
        y, state = layer.step(x[:, t], state, t=t if t == 0 else None)
        outs.append(y)
    assert state is not None
    return torch.stack(outs, 1), state


def inputs(steps: int, dtype: torch.dtype = torch.float64, seed: int = 1, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(B, steps, IN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


MIN_CELLS = ("mingru", "minlstm")



# ------------------------------------------------------------------------------------------- minGRU / minLSTM
@pytest.mark.parametrize("cell", MIN_CELLS)
def test_min_cells_compute_the_papers_equations(cell: str) -> None:
    """The layer's forward (the log-space parallel scan) against the plain linear-space recurrence, from a carried
    positive state and from zeros, to 1e-6 (float64: they agree far closer)."""
    layer = layer_of(cell)
    x = inputs(40)
    h0 = torch.rand(B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 0.1
    expected, last = min_reference(cell, layer, x, h0)
    with torch.no_grad():
        out, (h,) = layer(x, (h0.unsqueeze(0),))
        fresh, _ = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(h[0], last, atol=1e-6, rtol=0)
    torch.testing.assert_close(fresh, min_reference(cell, layer, x, torch.zeros(B, H, dtype=torch.float64))[0],
                               atol=1e-6, rtol=0)
    assert layer.cell.gate_names == (("z", "g") if cell == "mingru" else ("f", "i", "g"))


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_parallel_scan_and_sequential_steps_agree_over_a_window(cell: str) -> None:
    """A 128-character window: the parallel form (training) and the step (sampling), to 1e-5 relative in float32
    (each against the exact float64 recurrence too) and to 1e-10 in float64."""
    layer64 = layer_of(cell, scale=0.3)
    x64 = inputs(WINDOW)
    with torch.no_grad():
        parallel64, _ = layer64(x64)
        sequential64, _ = stepped(layer64, x64)
    torch.testing.assert_close(parallel64, sequential64, atol=0, rtol=1e-10)

    layer32 = RecurrentLayer(cell, IN, H).eval()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    x32 = x64.float()
    with torch.no_grad():
        parallel32, _ = layer32(x32)
        sequential32, _ = stepped(layer32, x32)
    assert parallel32.dtype == torch.float32
    for got in (parallel32, sequential32):
        assert float(((got.double() - sequential64).abs() / sequential64.abs()).max()) < 1e-5
    assert float(((parallel32 - sequential32).abs() / sequential32.abs()).max()) < 1e-5


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_the_scan_stays_finite_and_exact_with_saturated_gates(cell: str) -> None:
    """Pre-activations of +-40 (gates at 1 - 4e-18 or 4e-18, candidates up to 40): the float32 scan has no inf or
    NaN and matches the float64 recurrence; products of 128 such gates underflow, their logarithms do not. (Its
    rounding grows with |log a| a step, 40 here against about 1 in use: 5e-5 of h rather than 1e-5.)"""
    layer64 = layer_of(cell, scale=0.0)
    with torch.no_grad():
        layer64.weight_ih_l0.copy_(torch.randn(layer64.weight_ih_l0.shape, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(5)).sign() * 8.0)
    x64 = inputs(WINDOW, seed=4, scale=5.0).clamp(-1, 1)  # mostly +-1: |W x| up to 5 x 8
    layer32 = RecurrentLayer(cell, IN, H).eval()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    with torch.no_grad():
        expected, _ = min_reference(cell, layer64, x64, torch.zeros(B, H, dtype=torch.float64))
        got, _ = layer32(x64.float())
        assert 38 < float(projected(layer64, x64).abs().max()) <= 40
    assert bool(torch.isfinite(got).all())
    assert float(((got.double() - expected).abs() / expected.abs()).max()) < 5e-5


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_the_state_carried_across_windows_is_the_one_steps_reach(cell: str) -> None:
    """One call over 200 steps, and two calls of 77 and 123 (not multiples of the scan's chunk) with the state
    carried: the same outputs; and the carried state is the sequential form's after the first 77 steps."""
    layer = layer_of(cell)
    x = inputs(200)
    assert 77 % SCAN_CHUNK and 123 % SCAN_CHUNK
    with torch.no_grad():
        whole, final = layer(x)
        first, carried = layer(x[:, :77])
        second, final2 = layer(x[:, 77:], carried)
        _, stepped_state = stepped(layer, x[:, :77])
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(final2[0], final[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(carried[0], stepped_state[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_gradients_through_the_scan_are_the_recurrences(cell: str) -> None:
    """Gradients of a loss over every output, through the parallel scan, equal those through the step loop:
    for the weights, the bias, the input and the carried state."""
    grads = []
    for form in ("parallel", "sequential"):
        layer = layer_of(cell)
        layer.train()  # no dropout or weight drop on this layer (weight_drop = 0): only the path differs
        x = inputs(50).requires_grad_()
        h0 = (torch.rand(1, B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.2)
        h0.requires_grad_()
        out = layer(x, (h0,))[0] if form == "parallel" else stepped(layer, x, (h0,))[0]
        weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9))
        (out * weights).sum().backward()
        grads.append([layer.weight_ih_l0.grad, layer.bias_ih_l0.grad, x.grad, h0.grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("cell", MIN_CELLS)
def test_min_cells_have_no_recurrent_matrix_and_weight_drop_acts_on_the_input_matrix(cell: str) -> None:
    layer = RecurrentLayer(cell, IN, H, weight_drop=0.5)
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"weight_ih_l0", "bias_ih_l0"} and layer.cell.dropped_weight == "weight_ih"
    assert layer.weight_ih_l0.shape == ((2 if cell == "mingru" else 3) * H, IN)
    x = inputs(10, dtype=torch.float32)
    layer.train()
    torch.manual_seed(11)
    out = layer(x)[0]
    torch.manual_seed(11)  # the same mask, drawn by hand on weight_ih
    dropped = drop_weight(layer.weight_ih_l0, 0.5)
    bare = RecurrentLayer(cell, IN, H)
    with torch.no_grad():
        bare.weight_ih_l0.copy_(dropped)
        bare.bias_ih_l0.copy_(layer.bias_ih_l0)
    torch.testing.assert_close(out, bare(x)[0])
    assert not torch.allclose(out, layer.eval()(x)[0])  # eval: the raw weights
    layer.train()
    layer(x)[0].sum().backward()
    assert layer.weight_ih_l0.grad is not None and int((layer.weight_ih_l0.grad == 0).sum()) > 0  # dropped entries


def test_forget_bias_starts_the_memory_gate() -> None:
    """model.forget_bias: minGRU's b_z at minus it (1 - z keeps h), minLSTM's b_f at it, sLSTM's b_f at it."""
    for cell, block, sign in (("mingru", 0, -1.0), ("minlstm", 0, 1.0), ("slstm", 1, 1.0)):
        layer = RecurrentLayer(cell, IN, H, forget_bias=2.0)
        bias = layer.bias_ih_l0.detach()
        assert bool((bias[block * H : (block + 1) * H] == sign * 2.0).all()), cell
        assert float(bias.abs().sum()) == pytest.approx(2.0 * H), cell


# ------------------------------------------------------------------------------------------------------ sLSTM
def test_slstm_computes_the_papers_equations_and_the_stabiliser_is_a_rescaling() -> None:
    """Against the unstabilised recurrence (float64, inputs where exp does not overflow): h to 1e-6, and the kept
    c and n are the true ones divided by exp(m)."""
    layer = layer_of("slstm", scale=0.5)
    x = inputs(40, scale=2.0)
    expected, c_true, n_true = slstm_reference(layer, x)
    with torch.no_grad():
        out, (_, c, n, m) = layer(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(c[0] * torch.exp(m[0]), c_true, atol=0, rtol=1e-9)
    torch.testing.assert_close(n[0] * torch.exp(m[0]), n_true, atol=0, rtol=1e-9)
    assert bool((n >= 1 - 1e-12).all())  # the normaliser never drops below 1 after the first step


def test_slstm_stays_exact_where_exp_of_the_input_gate_overflows() -> None:
    """Input-gate pre-activations of 750-950, whose exp overflows float64 (max ~ exp(709.8)): the cell (float64)
    matches the plain reference (every input gate times exp(-850), which leaves h unchanged) to 1e-6, in its
    parallel form and stepped. In float32, where exp overflows past 88.7, pre-activations of 100-400 give finite
    states and h within float32's rounding of such inputs (1.5e-5 of 250)."""
    layer = layer_of("slstm", scale=0.3)
    with torch.no_grad():
        layer.bias_ih_l0[:H] += 850.0  # a_i = 850, give or take 60
        layer.weight_ih_l0[:H] *= 10.0
    x = inputs(60, scale=2.0)
    a_i = projected(layer, x).detach()[..., :H]
    assert float(a_i.min()) > 710 and float(a_i.max()) < 990
    assert not bool(torch.isfinite(torch.exp(a_i)).any())  # unstabilised, every input gate is inf
    expected, _, _ = slstm_reference(layer, x, shift=850.0)
    with torch.no_grad():
        out, state = layer(x)
        sampled, sampled_state = stepped(layer, x)
    assert all(bool(torch.isfinite(s).all()) for s in (*state, *sampled_state))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(sampled, expected, atol=1e-6, rtol=0)

    with torch.no_grad():
        layer.bias_ih_l0[:H] -= 600.0  # a_i = 250, give or take 60
    x32 = x.float()
    assert float(projected(layer, x).detach()[..., :H].min()) > 89
    layer32 = RecurrentLayer("slstm", IN, H).eval()
    layer32.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    with torch.no_grad():
        out32, state32 = layer32(x32)
    assert all(bool(torch.isfinite(s).all()) for s in state32)
    torch.testing.assert_close(out32.double(), slstm_reference(layer, x)[0], atol=1e-4, rtol=0)


def test_slstm_state_carries_across_windows_and_gates_are_the_stabilised_ones() -> None:
    layer = layer_of("slstm")
    x = inputs(90, scale=3.0)
    with torch.no_grad():
        whole, final = layer(x)
        first, carried = layer(x[:, :50])
        second, final2 = layer(x[:, 50:], carried)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=1e-12, rtol=0)
    for a, b in zip(final2, final, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert layer.cell.state_names == ("h", "c", "n", "m") and layer.cell.gate_names == ("i", "f", "g", "o")
    steps = list(layer.steps(x[:, :3]))
    for t, (state, gates) in enumerate(steps):
        for name in ("i", "f", "o"):
            assert bool(((gates[name] >= 0) & (gates[name] <= 1)).all()), name
        if t == 0:  # a fresh state: m = a_i, so i = 1 and nothing is carried (f = 0)
            assert bool((gates["i"] == 1).all()) and bool((gates["f"] == 0).all())
            torch.testing.assert_close(state[0], gates["o"] * gates["g"], atol=1e-12, rtol=0)
    # at every later step one of the stabilised gates is 1: m is the larger of the two log gates
    i, f = steps[2][1]["i"], steps[2][1]["f"]
    assert bool((torch.maximum(i, f) == 1).all())


def test_slstm_gradients_are_finite_from_a_fresh_state() -> None:
    """A fresh state's forget path is switched off by a mask, not by exp of a large number times zero."""
    layer = layer_of("slstm", scale=0.5, dtype=torch.float32)
    with torch.no_grad():
        layer.bias_ih_l0[:H] -= 200.0  # a_i far below log f + m = log s(a_f): exp(log f - a_i) overflows
    layer.train()
    x = inputs(8, dtype=torch.float32).requires_grad_()
    out, _ = layer(x)
    out.sum().backward()
    assert math.isfinite(float(out.detach().sum()))
    for p in (layer.weight_ih_l0.grad, layer.weight_hh_l0.grad, x.grad):
        assert p is not None and bool(torch.isfinite(p).all())


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("cell", ["mingru", "minlstm", "slstm"])
def test_each_cell_trains_scores_and_samples_through_the_cli(cell: str, corpus_file: Path, tmp_path: Path) -> None:
    """`charlm train --cell X` (the smoke config: weight drop off there, so also once with it on), `charlm eval` of
    its best checkpoint (the logged best validation loss again), and `charlm sample`, whose reported log-probability
    (the sequential steps) is the one the parallel forward gives the same text."""
    code, output = invoke(*smoke_args(corpus_file, tmp_path, cell, "--cell", cell, "--max-steps", "12",
                                      "--set", "train.val_every_steps=6", "--set", "model.weight_drop=0.3"))
    assert code == 0, output
    run = tmp_path / cell
    with (run / "metrics.csv").open() as fh:
        logged = min(float(row["val_loss"]) for row in csv.DictReader(fh) if row["val_loss"])
    assert logged < math.log(65)  # it learned something in 12 steps
    code, output = invoke("eval", "--checkpoint", str(run / "best.ckpt"), "--json")
    assert code == 0, output
    assert abs(json.loads(output)["loss"] - logged) < 1e-5
    code, output = invoke("sample", "--checkpoint", str(run / "best.ckpt"), "--prime", "ROMEO:", "--length", "60",
                          "--seed", "3", "--temperature", "1", "--json")
    assert code == 0, output
    sample = json.loads(output)["samples"][0]
    model, vocab, cfg, _ = load_model(run / "best.ckpt")
    assert cfg.model.cell == cell and model.layers[0].cell_name == cell
    ids = vocab.encode("ROMEO:" + sample["text"])  # the JSON's text is what followed the prime
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids[None, :-1]).logits[0].double(), -1)
    generated = ids[len("ROMEO:"):]
    by_forward = float(log_probs[len("ROMEO:") - 1 :].gather(1, generated[:, None]).sum())
    assert len(generated) == 60 and sample["logprob"] < -10
    assert by_forward == pytest.approx(sample["logprob"], abs=1e-3)


def test_charlm_cells_lists_the_new_cells_with_their_equations_without_torch() -> None:
    """`charlm cells` in a process where torch cannot be imported: the registry alone drives the listing."""
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['charlm', 'cells']; "
            "from charlm.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                                                                                            "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("│ ")}
    assert "z = s(W_z x), h' = (1-z)*h + z*g(W_h x)" in lines["mingru"]
    assert "h' = (f*h + i*g(W_h x)) / (f+i)" in lines["minlstm"]
    assert "c' = f*c + i*tanh(a_z), n' = f*n + i, h' = s(a_o)*c'/n'" in lines["slstm"]
    assert "m = max(log f + m, a_i)" in lines["slstm"]
