"""The oneDNN matrix products of the CPU kernels agree with PyTorch's own matmuls, and can be turned off."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from charlm.cells import onednn_matmul
from charlm.model.recurrent_layer import RecurrentLayer

needs_onednn = pytest.mark.skipif(onednn_matmul._ONEDNN is None, reason="this PyTorch build has no oneDNN linear ops")
TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32: oneDNN and MKL sum in different orders


@pytest.fixture
def onednn_always(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN for every size, so that the small test problems take the path big ones take."""
    monkeypatch.setattr(onednn_matmul, "MIN_CALLS", 1)
    monkeypatch.setattr(onednn_matmul, "MIN_ROWS", 1)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@needs_onednn
def test_onednn_only_where_packing_pays() -> None:
    w = randn(12, 5)
    assert onednn_matmul.StepProduct(w, 32, 16).packed is not None  # a kernel's 16+ steps
    assert onednn_matmul.StepProduct(w, 4096, 1).packed is not None  # one projection of many rows
    assert onednn_matmul.StepProduct(w, 32, 15).packed is None
    assert onednn_matmul.StepProduct(w, 1, 1).packed is None  # sampling: one row at a time


@needs_onednn
@pytest.mark.usefixtures("onednn_always")
def test_step_product_matches_addmm() -> None:
    w, x, out = randn(12, 5, seed=1), randn(4, 5, seed=2), randn(4, 12, seed=3)
    product = onednn_matmul.StepProduct(w, 4, 1)
    assert product.packed is not None
    torch.testing.assert_close(product(x), x @ w.t(), **TOL)
    torch.testing.assert_close(product.add_to(out.clone(), x), torch.addmm(out, x, w.t()), **TOL)
    torch.testing.assert_close(product.write(torch.empty_like(out), x), x @ w.t(), **TOL)
    # a transposed (non-contiguous) weight, as the backward passes use
    back = onednn_matmul.StepProduct(w.t(), 4, 1)
    torch.testing.assert_close(back(out), out @ w, **TOL)


def test_step_product_falls_back_to_addmm_outside_float32() -> None:
    w, x, out = (randn(*s, seed=k, dtype=torch.float64) for k, s in enumerate(((12, 5), (4, 5), (4, 12))))
    product = onednn_matmul.StepProduct(w, 4, 100)
    assert product.packed is None
    assert torch.equal(product.add_to(out.clone(), x), torch.addmm(out, x, w.t()))


@needs_onednn
@pytest.mark.usefixtures("onednn_always")
def test_projection_matches_f_linear_in_value_and_gradient() -> None:
    """``linear`` on a time-major view of a batch-first tensor, as the engine calls it."""
    x0, w0, b0 = randn(3, 7, 5, seed=4).transpose(0, 1), randn(12, 5, seed=5), randn(12, seed=6)
    dy = randn(7, 3, 12, seed=7)
    grads = []
    for fn in (onednn_matmul.linear, F.linear):
        x, w, b = (t.detach().clone().requires_grad_() for t in (x0, w0, b0))
        y = fn(x, w, b)
        (y * dy).sum().backward()
        grads.append((y, x.grad, w.grad, b.grad))
    assert grads[0][0].shape == (7, 3, 12)
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, **TOL)


@needs_onednn
@pytest.mark.usefixtures("onednn_always")
@pytest.mark.parametrize("cell", ["lstm", "peephole", "cifg", "noaf", "fgr", "lstm-ln", "lstm-bn", "gru", "gru-cho",
                                  "mut1", "mut3", "mogrifier"])
def test_cells_agree_with_and_without_onednn(cell: str) -> None:
    """Outputs, final state and every gradient, float32, with oneDNN on and off (MKL's addmm)."""
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, 6, 8, torch_rnn=False)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # peepholes, fgr's gate recurrence: away from zero
    x0 = randn(4, 9, 6, seed=8)
    results = []
    for context in (nullcontext, onednn_matmul.onednn_off):
        with context():
            layer.zero_grad()
            x = x0.clone().requires_grad_()
            out, final = layer(x)
            loss = (out * randn(*out.shape, seed=9)).sum() + sum((s * s).sum() for s in final)
            loss.backward()
        results.append([out, *final, x.grad, *(p.grad for p in layer.parameters())])
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, **TOL)


def test_charlm_onednn_0_turns_onednn_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHARLM_ONEDNN", "0")
    assert onednn_matmul._onednn_ops() is None
    monkeypatch.setenv("CHARLM_ONEDNN", "1")
    assert (onednn_matmul._onednn_ops() is not None) == torch.backends.mkldnn.is_available()


@needs_onednn
@pytest.mark.usefixtures("onednn_always")
def test_onednn_off_switches_to_pytorch_matmuls_inside_the_block_only() -> None:
    w = randn(12, 5)
    with onednn_matmul.onednn_off():
        assert onednn_matmul.StepProduct(w, 4, 1).packed is None
    assert onednn_matmul.StepProduct(w, 4, 1).packed is not None


@needs_onednn
@pytest.mark.usefixtures("onednn_always")
def test_custom_lstm_through_onednn_equals_nn_lstm() -> None:
    """float32, two layers, carried state: the engine's kernel against nn.LSTM."""
    torch.manual_seed(3)
    reference = torch.nn.LSTM(6, 8, 2, batch_first=True)
    custom = [RecurrentLayer("lstm", 6 if k == 0 else 8, 8, torch_rnn=False) for k in range(2)]
    for k, layer in enumerate(custom):  # nn.LSTM's weight_ih_l1 is the second layer's weight_ih_l0
        layer.load_state_dict({n.replace(f"_l{k}", "_l0"): v for n, v in reference.state_dict().items()
                               if n.endswith(f"_l{k}")})
    x0, h0, c0 = randn(3, 20, 6, seed=10), randn(2, 3, 8, seed=11), randn(2, 3, 8, seed=12)
    results = []
    for model in (reference, custom):
        x = x0.clone().requires_grad_()
        if model is reference:
            out, (h, c) = reference(x, (h0, c0))
            named = dict(reference.named_parameters())
        else:
            out, states = x, []
            for k, layer in enumerate(custom):
                out, state = layer(out, (h0[k : k + 1], c0[k : k + 1]))
                states.append(state)
            h, c = (torch.cat([st[j] for st in states]) for j in range(2))
            named = {
                n.replace("_l0", f"_l{k}"): p for k, layer in enumerate(custom) for n, p in layer.named_parameters()
            }
        ((out * randn(*out.shape, seed=13)).sum() + (h * c).sum()).backward()
        results.append([out, h, c, x.grad, *(named[n].grad for n in sorted(named))])
    assert len(results[0]) == len(results[1]) == 4 + 8
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, **TOL)
