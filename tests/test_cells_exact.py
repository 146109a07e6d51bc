"""Custom cells against the torch modules (nn.LSTM / nn.GRU / nn.RNN) holding the same weights: outputs, states
and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from charlm.model.recurrent_layer import RecurrentLayer, State

B, T, IN, H = 3, 5, 4, 6
TOL = 1e-5

TORCH_MODULES = {
    "lstm": lambda layers: nn.LSTM(IN, H, layers, batch_first=True),
    "gru": lambda layers: nn.GRU(IN, H, layers, batch_first=True),
    "rnn": lambda layers: nn.RNN(IN, H, layers, batch_first=True),
    "irnn": lambda layers: nn.RNN(IN, H, layers, nonlinearity="relu", batch_first=True),
}


def layers_of(ref: nn.RNNBase, cell: str) -> list[RecurrentLayer]:
    """Custom (torch_rnn=False) float64 layers holding the weights of a multi-layer torch module: its
    ``weight_ih_l1`` is the second layer's ``weight_ih_l0``."""
    layers = []
    for k in range(ref.num_layers):
        layer = RecurrentLayer(cell, ref.input_size if k == 0 else ref.hidden_size, ref.hidden_size,
                               torch_rnn=False).double()
        layer.load_state_dict({name.replace(f"_l{k}", "_l0"): value for name, value in ref.state_dict().items()
                               if name.endswith(f"_l{k}")})
        layers.append(layer)
    return layers


def run_layers(layers: list[RecurrentLayer], x: Tensor, states: list[State]) -> tuple[Tensor, list[State]]:
    """The layers one after another (as the language model runs them), each from its own state."""
    finals = []
    for layer, state in zip(layers, states, strict=True):
        x, final = layer(x, state)
        finals.append(final)
    return x, finals


def _loss(out: Tensor, states: list[Tensor]) -> Tensor:
    """A loss that weights every output and final state differently (so no gradient is trivial)."""
    g = torch.Generator().manual_seed(7)
    total = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    for k, s in enumerate(states):
        total = total + (k + 1.5) * (s * torch.randn(s.shape, generator=g, dtype=s.dtype)).sum()
    return total


def _initial(cell: str, layers: int) -> list[Tensor]:
    """Carried (non-zero) initial states in the torch module's layout (layers, B, H); c too for the LSTM."""
    g = torch.Generator().manual_seed(3)
    n = 2 if cell == "lstm" else 1
    return [torch.randn(layers, B, H, generator=g, dtype=torch.float64).requires_grad_() for _ in range(n)]


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn", "irnn"])
def test_custom_matches_torch_module(cell: str, layers: int) -> None:
    torch.manual_seed(0)
    ref = TORCH_MODULES[cell](layers).double()
    with torch.no_grad():  # move away from any special init so every weight matters
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = layers_of(ref, cell)
    assert not any(layer.torch_rnn for layer in ours)

    x = torch.randn(B, T, IN, dtype=torch.float64, requires_grad=True)
    init_ref = _initial(cell, layers)
    init_ours = [t.detach().clone().requires_grad_() for t in init_ref]

    out_ref, st_ref = ref(x, tuple(init_ref) if cell == "lstm" else init_ref[0])
    st_ref = list(st_ref) if cell == "lstm" else [st_ref]
    _loss(out_ref, st_ref).backward()
    grads_ref = {n: p.grad.clone() for n, p in ref.named_parameters()}
    gx_ref = x.grad.clone()
    x.grad = None

    per_layer = [tuple(t[k : k + 1] for t in init_ours) for k in range(layers)]
    out, states = run_layers(ours, x, per_layer)
    finals = [torch.cat([s[k] for s in states]) for k in range(len(init_ours))]
    torch.testing.assert_close(out, out_ref, atol=TOL, rtol=0)
    for a, b in zip(finals, st_ref, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)

    _loss(out, finals).backward()
    torch.testing.assert_close(x.grad, gx_ref, atol=TOL, rtol=0)
    for a, b in zip(init_ours, init_ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=TOL, rtol=0)
    ours_grads = {}
    for k, layer in enumerate(ours):
        for n, p in layer.named_parameters():
            ours_grads[n.replace("_l0", f"_l{k}")] = p.grad
    assert ours_grads.keys() == grads_ref.keys()
    for n, g in grads_ref.items():
        torch.testing.assert_close(ours_grads[n], g, atol=TOL, rtol=0, msg=n)


@pytest.mark.parametrize("cell", ["lstm", "lstm-b", "np", "gru", "rnn", "irnn"])
def test_torch_rnn_path_is_taken_and_exact(cell: str) -> None:
    """The automatic torch RNN kernel computes what the custom path computes (same weights)."""
    torch.manual_seed(1)
    fast = RecurrentLayer(cell, IN, H).double()
    slow = RecurrentLayer(cell, IN, H, torch_rnn=False).double()
    slow.load_state_dict(fast.state_dict())
    assert fast.torch_rnn and not slow.torch_rnn
    x = torch.randn(B, T, IN, dtype=torch.float64)
    state = fast.initial_state(B)
    state = tuple(torch.randn_like(s) for s in state)
    out_f, st_f = fast(x, state)
    out_s, st_s = slow(x, state)
    torch.testing.assert_close(out_f, out_s, atol=TOL, rtol=0)
    for a, b in zip(st_f, st_s, strict=True):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)


def test_state_dict_moves_to_torch_module_and_back() -> None:
    torch.manual_seed(2)
    layer = RecurrentLayer("lstm", IN, H, torch_rnn=False)
    ref = nn.LSTM(IN, H, batch_first=True)
    ref.load_state_dict(layer.state_dict())  # same names, same shapes
    assert set(layer.state_dict()) == set(ref.state_dict())
    x = torch.randn(B, T, IN)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], atol=TOL, rtol=0)
    gru = RecurrentLayer("gru", IN, H)
    gru.load_state_dict(nn.GRU(IN, H).state_dict())


def test_fp32_custom_lstm_close_to_torch() -> None:
    """The hand-written float32 kernel (sigmoid-based tanh for g) stays within float32 rounding of nn.LSTM."""
    torch.manual_seed(3)
    ref = nn.LSTM(8, 16, batch_first=True)
    layer = RecurrentLayer("lstm", 8, 16, torch_rnn=False)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(4, 40, 8, requires_grad=True)
    out_ref = ref(x)[0]
    out_ref.square().sum().backward()
    g_ref = ref.weight_hh_l0.grad.clone()
    out = layer(x)[0]
    out.square().sum().backward()
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.weight_hh_l0.grad, g_ref, atol=1e-4, rtol=1e-4)
