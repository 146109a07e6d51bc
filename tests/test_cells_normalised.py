"""The normalised LSTMs (lstm-ln, lstm-bn) compute what their equations say, through every kernel (C++, Python,
autograd): expected values written out step by step here, with the batch statistics of training, the running
statistics of evaluation and the steps beyond the longest trained length."""

from __future__ import annotations

import pytest
import torch
from cell_equations import IN, KERNELS, TOL, H, T, affine, check, make, rand_inputs, sig, tanh, use_kernel
from torch import Tensor

from charlm.model.recurrent_layer import RecurrentLayer


def layer_norm(v: Tensor, gain: Tensor, shift: Tensor | float = 0.0, eps: float = 1e-5) -> Tensor:
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * gain + shift


def lstm_gates(a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    ai, af, ag, ao = a.split(H, dim=-1)
    c = sig(af) * c + sig(ai) * tanh(ag)
    return sig(ao), c


@pytest.mark.parametrize("kernel", KERNELS)
def test_layer_norm_lstm(kernel: str) -> None:
    layer = make("lstm-ln")
    x, state = rand_inputs(layer)
    h, c = state[0][0], state[1][0]
    b = layer.bias_ih_l0 + layer.bias_hh_l0
    outs = []
    for t in range(T):
        a = (layer_norm(affine(layer.weight_ih_l0, x[:, t]), layer.ln_ih_weight_l0)
             + layer_norm(affine(layer.weight_hh_l0, h), layer.ln_hh_weight_l0) + b)
        o, c = lstm_gates(a, c)
        h = o * tanh(layer_norm(c, layer.ln_c_weight_l0, layer.ln_c_bias_l0))
        outs.append(h)
    with use_kernel(layer, kernel):
        check(layer, torch.stack(outs, 1), x, state)


def batch_norm(v: Tensor, gain: Tensor, shift: Tensor | float, mean: Tensor, var: Tensor) -> Tensor:
    return (v - mean) / torch.sqrt(var + 1e-5) * gain + shift


def bn_reference(layer: RecurrentLayer, x: Tensor, state: tuple[Tensor, ...], stats: dict[str, list[Tensor]] | None):
    """Recurrent BN LSTM; stats None: batch statistics per step (training), else the given per-step list."""
    h, c = state[0][0], state[1][0]
    b = layer.bias_ih_l0 + layer.bias_hh_l0
    outs = []
    for t in range(x.shape[1]):

        def norm(v: Tensor, key: str, gain: Tensor, shift: Tensor | float, t: int = t) -> Tensor:
            if stats is None:
                return batch_norm(v, gain, shift, v.mean(0), v.var(0, unbiased=False))
            k = min(t, len(stats[key + "_mean"]) - 1)  # beyond the trained length: the last step's
            return batch_norm(v, gain, shift, stats[key + "_mean"][k], stats[key + "_var"][k])

        a = (norm(affine(layer.weight_ih_l0, x[:, t]), "ih", layer.bn_ih_weight_l0, 0.0)
             + norm(affine(layer.weight_hh_l0, h), "hh", layer.bn_hh_weight_l0, 0.0) + b)
        o, c = lstm_gates(a, c)
        h = o * tanh(norm(c, "c", layer.bn_c_weight_l0, layer.bn_c_bias_l0))
        outs.append(h)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batch_norm_lstm_training_eval_and_beyond_length(kernel: str) -> None:
    fresh = RecurrentLayer("lstm-bn", IN, H)
    assert torch.all(fresh.bn_ih_weight_l0 == 0.1) and torch.all(fresh.bn_c_weight_l0 == 0.1)
    assert fresh.bn_ih_mean_l0.shape == (0, 4 * H)

    layer = make("lstm-bn")
    x, state = rand_inputs(layer)
    layer.train()
    with use_kernel(layer, kernel):
        check(layer, bn_reference(layer, x, state, None), x, state)  # batch statistics at every step
    # running statistics: one per time step, momentum 0.1 from (mean 0, var 1), unbiased variance
    assert layer.bn_ih_mean_l0.shape == (T, 4 * H) and layer.bn_c_var_l0.shape == (T, H)
    v0 = affine(layer.weight_ih_l0, x[:, 0])
    torch.testing.assert_close(layer.bn_ih_mean_l0[0], 0.1 * v0.mean(0), atol=TOL, rtol=0)
    torch.testing.assert_close(layer.bn_ih_var_l0[0], 0.9 + 0.1 * v0.var(0, unbiased=True), atol=TOL, rtol=0)
    v3 = affine(layer.weight_ih_l0, x[:, 3])
    torch.testing.assert_close(layer.bn_ih_mean_l0[3], 0.1 * v3.mean(0), atol=TOL, rtol=0)

    layer.eval()
    stats = {k: list(getattr(layer, f"bn_{k}_l0").unbind(0))
             for k in ("ih_mean", "ih_var", "hh_mean", "hh_var", "c_mean", "c_var")}
    x_long, state_long = rand_inputs(layer, steps=T + 3)  # 3 steps beyond the longest training length
    check(layer, bn_reference(layer, x_long, state_long, stats), x_long, state_long)

    # the statistics' length survives a state_dict round trip into a fresh layer
    other = RecurrentLayer("lstm-bn", IN, H).double().eval()
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other(x_long, state_long)[0], layer(x_long, state_long)[0], atol=TOL, rtol=0)


def test_batch_norm_kernel_moves_the_running_statistics_like_the_step_loop() -> None:
    """Every per-step statistic (of W x, U h and c') after two training calls, kernels against autograd."""
    x, state = rand_inputs(make("lstm-bn"))
    buffers = []
    for kernel in KERNELS:
        layer = make("lstm-bn")
        with use_kernel(layer, kernel):
            layer(x, state)
            layer(x.flip(1), state)
        buffers.append(dict(layer.named_buffers()))
    assert sorted(buffers[0]) == sorted(f"bn_{k}_{s}_l0" for k in ("ih", "hh", "c") for s in ("mean", "var"))
    for kernel_buffers in buffers[:-1]:
        for name, value in kernel_buffers.items():
            assert value.shape[0] == T and value.abs().sum() > 0
            torch.testing.assert_close(value, buffers[-1][name], atol=TOL, rtol=0)
