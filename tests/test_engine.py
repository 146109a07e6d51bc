"""The engine: weight drop, torch-kernel/custom agreement, state handling, compiled steps, errors."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import charlm.model.recurrent_layer as engine
from charlm.config import Config, ModelConfig, from_dict, load_config
from charlm.model.char_lm import CharLM
from charlm.model.checkpoint import FORMAT_VERSION, load_model
from charlm.model.recurrent_layer import RecurrentLayer, State
from charlm.model.regularizers import drop_weight
from charlm.util.errors import CharlmError

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


@pytest.mark.parametrize("torch_rnn", [True, False], ids=["torch", "custom"])
def test_weight_drop_one_mask_per_forward(recorder: Recorder, torch_rnn: bool) -> None:
    torch.manual_seed(0)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, torch_rnn=torch_rnn).double().train()
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


@pytest.mark.parametrize("torch_rnn", [True, False], ids=["torch", "custom"])
def test_weight_drop_eval_uses_raw_weights(torch_rnn: bool) -> None:
    torch.manual_seed(1)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, torch_rnn=torch_rnn).double()
    layer(torch.randn(B, T, IN, dtype=torch.float64))  # a training call first must leave nothing behind
    layer.eval()
    x = torch.randn(B, T, IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], lstm_with(layer)(x)[0], atol=1e-12, rtol=0)
    assert type(layer.weight_hh_l0) is nn.Parameter


@pytest.mark.parametrize("variational", [False, True], ids=["elementwise", "variational"])
@pytest.mark.parametrize("torch_rnn", [True, False], ids=["torch", "custom"])
def test_weight_drop_gradient_reaches_raw_weight(recorder: Recorder, torch_rnn: bool, variational: bool) -> None:
    torch.manual_seed(2)
    p = 0.4
    layer = RecurrentLayer(
        "lstm", IN, H, weight_drop=p, weight_drop_variational=variational, torch_rnn=torch_rnn
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
    for torch_rnn in (True, False):
        layer = RecurrentLayer("lstm", IN, H, weight_drop=0.0, torch_rnn=torch_rnn).train()
        x = torch.randn(B, T, IN)
        torch.testing.assert_close(layer(x)[0], lstm_with(layer)(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_torch_rnn_and_custom_draw_the_same_masks(cell: str) -> None:
    torch.manual_seed(4)
    a = RecurrentLayer(cell, IN, H, weight_drop=0.3).double()
    b = RecurrentLayer(cell, IN, H, weight_drop=0.3, torch_rnn=False).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(B, T, IN, dtype=torch.float64)
    torch.manual_seed(9)
    out_a = a(x)[0]
    torch.manual_seed(9)
    out_b = b(x)[0]
    torch.testing.assert_close(out_a, out_b, atol=1e-12, rtol=0)


def test_gru_trains_through_its_kernel_on_a_cpu_and_equals_the_torch_op() -> None:
    """``gru`` (CellSpec.kernel_first_on_cpu) runs its hand-written kernel on a CPU for more than one row; one row,
    autocast, or ``kernel_first_on_cpu`` off: the ATen op. Both give the same outputs, states and gradients."""
    torch.manual_seed(6)
    layer = RecurrentLayer("gru", IN, H, weight_drop=0.3).double()
    x = torch.randn(B, T, IN, dtype=torch.float64)
    assert layer.torch_rnn and not layer.runs_torch_rnn(x) and layer.runs_torch_rnn(x[:1])
    assert layer.runs_torch_rnn(x.float().to(torch.bfloat16)) and RecurrentLayer("lstm", IN, H).runs_torch_rnn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.runs_torch_rnn(x.float())
    results = []
    for kernel_first in (True, False):
        layer.kernel_first_on_cpu = kernel_first
        assert layer.runs_torch_rnn(x) is not kernel_first
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        h0 = torch.randn(1, B, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
        torch.manual_seed(9)  # the same weight-drop mask
        out, (h,) = layer(xi, (h0,))
        (out.sin().sum() + 2.0 * h.cos().sum()).backward()
        results.append([out, h, xi.grad, h0.grad, *(p.grad for p in layer.parameters())])
    for ours, op in zip(*results, strict=True):
        torch.testing.assert_close(ours, op, atol=1e-12, rtol=0)


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


def test_no_warnings_from_torch_rnn_or_custom_paths() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for torch_rnn in (True, False):
            for _ in range(3):
                layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, torch_rnn=torch_rnn)
                out, _ = layer(torch.randn(B, T, IN))
                out.sum().backward()
    assert not caught, [str(w.message) for w in caught]


def test_initial_state_and_shapes() -> None:
    lstm = RecurrentLayer("lstm", IN, H)
    st = lstm.initial_state(B)
    assert lstm.num_states == 2 and [s.shape for s in st] == [(1, B, H), (1, B, H)]
    assert all(torch.all(s == 0) for s in st)
    out, final = lstm(torch.randn(B, T, IN))
    assert out.shape == (B, T, H) and [s.shape for s in final] == [(1, B, H)] * 2
    gru = RecurrentLayer("gru", IN, H)
    assert gru.num_states == 1 and gru.initial_state(B, dtype=torch.float64)[0].dtype == torch.float64
    fgr = RecurrentLayer("fgr", IN, H)
    assert [s.shape for s in fgr.initial_state(B)] == [(1, B, H), (1, B, H), (1, B, 3 * H)]
    with pytest.raises(CharlmError, match="batch, time, features"):
        gru(torch.randn(T, IN))


@pytest.mark.parametrize("cell", ["lstm", "peephole", "gru-cho", "mut2"])
def test_carried_state_splits_a_sequence(cell: str) -> None:
    """Truncated BPTT: running two halves with the state carried equals running the whole."""
    torch.manual_seed(8)
    layers = [RecurrentLayer(cell, IN, H, torch_rnn=False).eval(), RecurrentLayer(cell, H, H, torch_rnn=False).eval()]

    def stack(x: Tensor, states: list[State] | None = None) -> tuple[Tensor, list[State]]:
        finals = []
        for k, layer in enumerate(layers):
            x, final = layer(x, None if states is None else states[k])
            finals.append(final)
        return x, finals

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
    # the weight-drop range is the config's to check (tests/test_bad_input.py); the init name the layer's
    with pytest.raises(CharlmError, match="unknown init 'he'"):
        RecurrentLayer("lstm", IN, H, init="he")
    assert not RecurrentLayer("peephole", IN, H).torch_rnn
    assert RecurrentLayer("lstm-b", IN, H).torch_rnn and not RecurrentLayer("lstm", IN, H, torch_rnn=False).torch_rnn
    assert "weight_drop=0.5" in repr(RecurrentLayer("lstm", IN, H, weight_drop=0.5))


def test_a_checkpoint_config_with_model_native_is_read_as_model_torch_rnn(tmp_path: Path) -> None:
    """Checkpoints written before the rename keep ``model.native`` in their config; loading one reads it as
    ``model.torch_rnn`` (sampling, evaluating and resuming all read it through ``config.from_dict``)."""
    config = Config()
    config.model = ModelConfig(cell="gru", embedding_size=4, hidden_size=4, num_layers=1, torch_rnn=False)
    saved = config.to_dict()
    saved["model"] = {("native" if k == "torch_rnn" else k): v for k, v in saved["model"].items()}
    model = CharLM(3, config.model)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"config": saved, "vocab": "abc", "format_version": FORMAT_VERSION}},
               tmp_path / "old.ckpt")
    loaded, _, loaded_config, _ = load_model(tmp_path / "old.ckpt")
    assert loaded_config.model.torch_rnn is False and not loaded.layers[0].torch_rnn
    assert from_dict({"model": {"native": True}}).model.torch_rnn is True
    with pytest.raises(CharlmError) as err:  # a config file or --set names the key as it is now
        load_config(None, ["model.native=false"])
    assert str(err.value) == "config key 'model.native' is now called 'model.torch_rnn'; use that name"


def test_compile_runs_the_cells_own_compiled_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile=True: the cell compiles its own step, which forward's time loop (in place of the hand-written
    kernel) and step() call, with eager's results; cells with a torch RNN kernel ignore it."""
    calls: list[int] = []
    real_compile = torch.compile

    def counting_compile(fn: Any) -> Any:
        compiled = real_compile(fn, backend="eager")  # Dynamo's tracing without code generation: fast

        def call(*args: Any) -> Any:
            calls.append(1)
            return compiled(*args)

        return call

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch.manual_seed(9)
    layer = RecurrentLayer("peephole", IN, H, compile=True).double()
    eager = RecurrentLayer("peephole", IN, H).double()
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(B, T, IN, dtype=torch.float64)
    assert layer.cell.step_compiled and not layer.cell.uses_kernel(x) and eager.cell.uses_kernel(x)
    out, _ = layer(x)
    assert len(calls) == T
    torch.testing.assert_close(out, eager(x)[0], atol=1e-12, rtol=0)
    layer.eval()
    eager.eval()
    torch.testing.assert_close(layer.step(x[:, 0])[0], eager.step(x[:, 0])[0], atol=1e-12, rtol=0)
    assert len(calls) == T + 1
    assert not RecurrentLayer("lstm", IN, H, compile=True).cell.step_compiled


@pytest.mark.parametrize("torch_rnn", [True, False], ids=["torch", "custom"])
def test_weight_drop_under_torch_compile_matches_eager(torch_rnn: bool) -> None:
    """torch.compile (Dynamo + AOTAutograd, no C++ codegen) draws a fresh mask per call, as eager does."""
    torch.manual_seed(6)
    layer = RecurrentLayer("lstm", IN, H, weight_drop=0.5, torch_rnn=torch_rnn).double()
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
