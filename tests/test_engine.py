"""The engine: weight drop, native/custom agreement, state handling, stacks, errors."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import Tensor, nn

import charlm.engine as engine
from charlm.engine import RecurrentLayer, RecurrentStack
from charlm.errors import CharlmError
from charlm.regularizers import drop_weight

B, T, IN, H = 3, 7, 4, 5


class Recorder:
    """Wraps drop_weight and keeps every matrix it hands out."""

    def __init__(self) -> None:
        self.calls: list[Tensor] = []

    def __call__(self, weight: Tensor, p: float, variational: bool = False, training: bool = True) -> Tensor:
        out = drop_weight(weight, p, variational, training)
        self.calls.append(out.detach().clone())
        return out


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(engine, "drop_weight", rec)
    return rec


def lstm_with(layer: RecurrentLayer, weight_hh: Tensor | None = None) -> nn.LSTM:
    """An nn.LSTM holding the layer's weights (optionally a given weight_hh)."""
    ref = nn.LSTM(layer.input_size, layer.hidden_size, batch_first=True).to(layer.weight_ih_l0.dtype)
    ref.load_state_dict(layer.state_dict())
    if weight_hh is not None:
        with torch.no_grad():
            ref.weight_hh_l0.copy_(weight_hh)
    return ref


@pytest.mark.parametrize("native", [True, False], ids=["native", "custom"])
def test_weight_drop_one_mask_per_forward(recorder: Recorder, native: bool) -> None:
    torch.manual_seed(0)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, native=native).double().train()
    x = torch.randn(B, T, IN, dtype=torch.float64)
    out1, _ = layer(x)
    assert len(recorder.calls) == 1  # one mask for the whole sequence
    dropped = recorder.calls[0]
    assert (dropped == 0).any() and not torch.equal(dropped, layer.weight_hh_l0.detach())
    # the same dropped matrix at every time step: a plain LSTM holding it gives the same output
    torch.testing.assert_close(out1, lstm_with(layer, dropped)(x)[0], atol=1e-12, rtol=0)
    out2, _ = layer(x)
    assert len(recorder.calls) == 2 and not torch.equal(recorder.calls[1], dropped)  # redrawn per call
    assert not torch.allclose(out1, out2)


@pytest.mark.parametrize("native", [True, False], ids=["native", "custom"])
def test_weight_drop_eval_uses_raw_weights(native: bool) -> None:
    torch.manual_seed(1)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, native=native).double()
    layer(torch.randn(B, T, IN, dtype=torch.float64))  # a training call first must leave nothing behind
    layer.eval()
    x = torch.randn(B, T, IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], lstm_with(layer)(x)[0], atol=1e-12, rtol=0)
    assert type(layer.weight_hh_l0) is nn.Parameter


@pytest.mark.parametrize("variational", [False, True], ids=["elementwise", "variational"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "custom"])
def test_weight_drop_gradient_reaches_raw_weight(recorder: Recorder, native: bool, variational: bool) -> None:
    torch.manual_seed(2)
    p = 0.4
    layer = RecurrentLayer(
        "lstm", IN, H, weight_drop=p, weight_drop_variational=variational, native=native
    ).double()
    x = torch.randn(B, T, IN, dtype=torch.float64)
    out, _ = layer(x)
    out.square().sum().backward()
    dropped = recorder.calls[0]
    keep = (dropped != 0).to(dropped.dtype)
    if variational:  # whole rows dropped, the kept ones scaled by 1/(1-p)
        assert torch.all((keep.sum(1) == 0) | (keep.sum(1) == H))
    # reference: the gradient wrt the dropped matrix, sent back through the mask
    ref = lstm_with(layer, dropped)
    ref(x)[0].square().sum().backward()
    expected = ref.weight_hh_l0.grad * keep / (1 - p)
    grad = layer.weight_hh_l0.grad
    assert grad is not None and grad.abs().sum() > 0
    torch.testing.assert_close(grad, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.weight_ih_l0.grad, ref.weight_ih_l0.grad, atol=1e-10, rtol=0)


def test_weight_drop_zero_is_the_plain_module() -> None:
    torch.manual_seed(3)
    for native in (True, False):
        layer = RecurrentLayer("lstm", IN, H, weight_drop=0.0, native=native).train()
        x = torch.randn(B, T, IN)
        torch.testing.assert_close(layer(x)[0], lstm_with(layer)(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_native_and_custom_draw_the_same_masks(cell: str) -> None:
    torch.manual_seed(4)
    a = RecurrentLayer(cell, IN, H, weight_drop=0.3, bidirectional=True).double()
    b = RecurrentLayer(cell, IN, H, weight_drop=0.3, bidirectional=True, native=False).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, T, IN, dtype=torch.float64)
    torch.manual_seed(9)
    out_a = a(x)[0]
    torch.manual_seed(9)
    out_b = b(x)[0]
    torch.testing.assert_close(out_a, out_b, atol=1e-12, rtol=0)


def test_bidirectional_gets_a_mask_per_direction(recorder: Recorder) -> None:
    layer = RecurrentLayer("gru", IN, H, weight_drop=0.5, bidirectional=True)
    layer(torch.randn(B, T, IN))
    assert len(recorder.calls) == 2


def test_state_dict_round_trip_and_to() -> None:
    torch.manual_seed(5)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5)
    layer(torch.randn(B, T, IN))  # a training forward first
    keys = set(nn.LSTM(IN, H).state_dict())
    assert set(layer.state_dict()) == keys  # no _raw / mask entries
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = RecurrentLayer("lstm", IN, H, weight_drop=0.5)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    layer.eval()
    other.eval()
    x = torch.randn(B, T, IN)
    torch.testing.assert_close(other(x)[0], layer(x)[0], atol=0, rtol=0)
    moved = copy.deepcopy(other).to(torch.float64).train()
    assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float64 for p in moved.parameters())
    out, _ = moved(x.double())
    out.sum().backward()
    assert moved.weight_hh_l0.grad is not None and moved.weight_hh_l0.grad.dtype == torch.float64


def test_no_warnings_from_native_or_custom_paths() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for native in (True, False):
            for _ in range(3):
                layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, native=native)
                out, _ = layer(torch.randn(B, T, IN))
                out.sum().backward()
    assert not caught, [str(w.message) for w in caught]


def test_initial_state_and_shapes() -> None:
    bi = RecurrentLayer("lstm", IN, H, bidirectional=True)
    st = bi.initial_state(B)
    assert bi.num_states == 2 and [s.shape for s in st] == [(2, B, H), (2, B, H)]
    assert all(torch.all(s == 0) for s in st)
    out, final = bi(torch.randn(B, T, IN))
    assert out.shape == (B, T, 2 * H) and [s.shape for s in final] == [(2, B, H)] * 2
    gru = RecurrentLayer("gru", IN, H)
    assert gru.num_states == 1 and gru.initial_state(B, dtype=torch.float64)[0].dtype == torch.float64
    fgr = RecurrentLayer("fgr", IN, H)
    assert [s.shape for s in fgr.initial_state(B)] == [(1, B, H), (1, B, H), (1, B, 3 * H)]
    with pytest.raises(CharlmError, match="bidirectional"):
        bi.step(torch.randn(B, IN))
    with pytest.raises(CharlmError, match="batch, time, features"):
        gru(torch.randn(T, IN))


def test_stack_layers_between_and_states() -> None:
    torch.manual_seed(6)
    calls = []

    class Tap(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            calls.append(x.shape)
            return x * 2.0

    stack = RecurrentStack("gru", IN, H, 3, between=Tap(), bidirectional=True, weight_drop=0.2)
    assert [layer.input_size for layer in stack.layers] == [IN, 2 * H, 2 * H]
    x = torch.randn(B, T, IN)
    out, states = stack(x)
    assert out.shape == (B, T, 2 * H) and len(states) == 3 and len(calls) == 2
    assert [s[0].shape for s in states] == [(2, B, H)] * 3


@pytest.mark.parametrize("cell", ["lstm", "peephole", "gru-cho", "mut2"])
def test_carried_state_splits_a_sequence(cell: str) -> None:
    """Truncated BPTT: running two halves with the state carried equals running the whole."""
    torch.manual_seed(8)
    stack = RecurrentStack(cell, IN, H, 2, native=False).eval()
    x = torch.randn(B, T, IN)
    whole, st_whole = stack(x)
    a, st = stack(x[:, :3])
    b, st = stack(x[:, 3:], st)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=1e-6, rtol=0)
    for s1, s2 in zip(st, st_whole, strict=True):
        torch.testing.assert_close(s1[0], s2[0], atol=1e-6, rtol=0)


def test_awd_style_layers_with_step_sampling() -> None:
    """The language model's use: single layers, last one narrower, stepped one char at a time."""
    torch.manual_seed(7)
    layers = [RecurrentLayer("lstm", IN, 8), RecurrentLayer("peephole", 8, 8), RecurrentLayer("gru", 8, 3)]
    for layer in layers:
        layer.eval()
    x = torch.randn(2, 6, IN)
    h = x
    for layer in layers:
        h, _ = layer(h)
    states: list[tuple[Tensor, ...] | None] = [None] * 3
    for t in range(6):
        v = x[:, t]
        for k, layer in enumerate(layers):
            v, states[k] = layer.step(v, states[k])
        torch.testing.assert_close(v, h[:, t], atol=1e-6, rtol=0)


def test_layer_options_are_checked() -> None:
    with pytest.raises(CharlmError, match="weight_drop"):
        RecurrentLayer("lstm", IN, H, weight_drop=1.0)
    with pytest.raises(CharlmError, match="num_layers"):
        RecurrentStack("lstm", IN, H, 0)
    assert not RecurrentLayer("peephole", IN, H).native
    assert RecurrentLayer("lstm-b", IN, H).native and not RecurrentLayer("lstm", IN, H, native=False).native
    assert "weight_drop=0.5" in repr(RecurrentLayer("lstm", IN, H, weight_drop=0.5))


@pytest.mark.parametrize("native", [True, False], ids=["native", "custom"])
def test_weight_drop_under_torch_compile_matches_eager(native: bool) -> None:
    """torch.compile (Dynamo + AOTAutograd, no C++ codegen) draws a fresh mask per call, as eager does."""
    torch.manual_seed(6)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, native=native).double()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(B, T, IN, dtype=torch.float64)
    results = []
    for model in (layer, compiled):
        layer.zero_grad()
        torch.manual_seed(11)
        out1, _ = model(x)
        out2, _ = model(x)
        (out1.square().sum() + out2.sum()).backward()
        results.append((out1, out2, layer.weight_hh_l0.grad.clone(), layer.weight_ih_l0.grad.clone()))
    eager, traced = results
    assert not torch.allclose(traced[0], traced[1])  # the mask is not baked into the compiled graph
    for a, b in zip(eager, traced, strict=True):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    layer.eval()
    torch.testing.assert_close(compiled(x)[0], lstm_with(layer)(x)[0], atol=1e-12, rtol=0)
