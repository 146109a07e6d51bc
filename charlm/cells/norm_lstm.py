"""Normalised LSTMs: layer normalisation and recurrent batch normalisation.

Both keep nn.LSTM's ``weight_ih`` [4H, in], ``weight_hh`` [4H, H], ``bias_ih``, ``bias_hh`` (gate order
i, f, g, o) and add their gains (and the cell-state shift) as extra parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from charlm.cells import norm_lstm_cpp
from charlm.cells.base import Cell, CellState, Gates, Params, standard_shapes
from charlm.cells.lstm_kernel import kernel_runs_on
from charlm.cells.norm_lstm_kernel import PYTHON_LOOP, NormLSTMKernel, StepNorm, TimeLoop, batch_norm_over_steps
from charlm.cells.onednn_matmul import linear

EPS = 1e-5


def _loop(x: Tensor) -> TimeLoop:
    """The kernel's C++ time loops on the CPU where they are built, else the Python ones."""
    return norm_lstm_cpp.CPP_LOOP if x.device.type == "cpu" and norm_lstm_cpp.available() else PYTHON_LOOP


def _lstm_tail(gates: Tensor, c: Tensor, hs: int) -> tuple[Tensor, Gates]:
    """LSTM gate activations from normalised pre-activations (i, f, g, o): returns (c', the gates)."""
    i = torch.sigmoid(gates[:, :hs])
    f = torch.sigmoid(gates[:, hs : 2 * hs])
    g = torch.tanh(gates[:, 2 * hs : 3 * hs])
    o = torch.sigmoid(gates[:, 3 * hs :])
    return f * c + i * g, {"i": i, "f": f, "g": g, "o": o}


class _NormalisedLSTMCell(Cell):
    """What the two normalised LSTMs share: nn.LSTM's weights plus the gains ``{prefix}_ih_weight``,
    ``{prefix}_hh_weight`` [4H], ``{prefix}_c_weight`` [H] (starting at ``gain_init``) and the cell
    shift ``{prefix}_c_bias`` [H] (starting at 0); the forget-gate block is the second."""

    state_names = ("h", "c")
    gate_names = ("i", "f", "g", "o")
    prefix: str
    gain_init: float

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = standard_shapes(4, 4, self.input_size, self.hidden_size)
        g, h, k = 4 * self.hidden_size, self.hidden_size, self.prefix
        shapes.update({f"{k}_ih_weight": (g,), f"{k}_hh_weight": (g,), f"{k}_c_weight": (h,), f"{k}_c_bias": (h,)})
        return shapes

    def forget_block(self) -> tuple[int, float] | None:
        return 1, 1.0

    def reset_parameters(self, p: Params, init: str, forget_bias: float) -> None:
        super().reset_parameters(p, init, forget_bias)
        with torch.no_grad():
            for part in ("ih", "hh", "c"):
                p[f"{self.prefix}_{part}_weight"].fill_(self.gain_init)
            p[f"{self.prefix}_c_bias"].zero_()


class LayerNormLSTMCell(_NormalisedLSTMCell):
    """Layer-normalised LSTM (Ba, Kiros & Hinton 2016, "Layer Normalization", eqs. 20-22):

        [a_i, a_f, a_g, a_o] = LN(W x; a_x) + LN(U h; a_h) + b
        i, f, o = s(.), g = tanh(.),  c' = f * c + i * g,  h' = o * tanh(LN(c'; a_c, b_c))

    LN normalises over the whole 4H pre-activation vector (as the paper writes it), with gains
    ``ln_ih_weight``, ``ln_hh_weight`` [4H] (init 1) and no shift of its own (b = ``bias_ih`` +
    ``bias_hh`` is the shift); the cell norm has ``ln_c_weight`` (1) and ``ln_c_bias`` (0) [H].
    The unnormalised c' is carried to the next step. On float32/float64 without autocast the whole
    sequence runs in a hand-written kernel: on the CPU the C++ loops of :mod:`charlm.cells.norm_lstm_cpp`
    (where they build), else the Python kernel of :mod:`charlm.cells.norm_lstm_kernel`.
    """

    prefix, gain_init = "ln", 1.0

    @property
    def _gates(self) -> tuple[int]:
        return (4 * self.hidden_size,)

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        shift = q["bias_ih"] + q["bias_hh"]
        return F.layer_norm(linear(x, q["weight_ih"]), self._gates, q["ln_ih_weight"], shift, EPS)

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h, c = state[0], state[1]
        hs = self.hidden_size
        gates = xw + F.layer_norm(h @ q["weight_hh"].t(), (4 * hs,), q["ln_hh_weight"], None, EPS)
        c_new, named = _lstm_tail(gates, c, hs)
        h_new = named["o"] * torch.tanh(F.layer_norm(c_new, (hs,), q["ln_c_weight"], q["ln_c_bias"], EPS))
        return (h_new, c_new), named

    def has_kernel_for(self, x: Tensor) -> bool:
        return kernel_runs_on(x)

    def run(self, x: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        if not self.uses_kernel(x):
            return super().run(x, state, q)
        hs, h, c = NormLSTMKernel.apply(
            linear(x, q["weight_ih"]), q["ln_ih_weight"], q["bias_ih"] + q["bias_hh"], state[0], state[1],
            q["weight_hh"], q["ln_hh_weight"], q["ln_c_weight"], q["ln_c_bias"], StepNorm("layer", EPS), _loop(x),
        )
        return hs, (h, c)


class BatchNormLSTMCell(_NormalisedLSTMCell):
    """LSTM with recurrent batch normalisation (Cooijmans et al. 2016, "Recurrent Batch Normalization"):

        [a_i, a_f, a_g, a_o] = BN_t(W x; g_x) + BN_t(U h; g_h) + b
        i, f, o = s(.), g = tanh(.),  c' = f * c + i * g,  h' = o * tanh(BN_t(c'; g_c, b_c))

    BN_t normalises over the batch with statistics kept separately for every time step t and the
    gains / shifts shared across time. Gains ``bn_ih_weight``, ``bn_hh_weight`` [4H] and
    ``bn_c_weight`` [H] start at 0.1 (the paper's advice, keeping tanh/sigmoid out of saturation),
    ``bn_c_bias`` at 0; the shifts of the two gate norms are b = ``bias_ih`` + ``bias_hh``.

    Running statistics (momentum 0.1, unbiased variance) are buffers ``bn_{ih,hh,c}_{mean,var}`` of
    shape [L, .], where L is the longest training sequence seen so far (they grow in training and
    resize on ``load_state_dict``). In eval, step t >= L uses the statistics of step L - 1; with no
    training yet (L = 0) they are mean 0, variance 1. ``RecurrentLayer.step`` continues the time
    index of the previous ``forward``/``step`` call and restarts it at 0 when given no state.
    Training on float32/float64 (batch > 1, no autocast) runs in a hand-written kernel: the C++ loops
    of :mod:`charlm.cells.norm_lstm_cpp` on the CPU (where they build), else
    :mod:`charlm.cells.norm_lstm_kernel`'s.
    """

    prefix, gain_init = "bn", 0.1
    momentum = 0.1

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        g, h = 4 * self.hidden_size, self.hidden_size
        return {f"bn_{k}_{s}": (0, n) for k, n in (("ih", g), ("hh", g), ("c", h)) for s in ("mean", "var")}

    def grow_buffers(self, buffers: Params, steps: int) -> Params:
        out = dict(buffers)
        for name, buf in buffers.items():
            if buf.shape[0] < steps:
                fill = 1.0 if name.endswith("_var") else 0.0
                extra = buf.new_full((steps - buf.shape[0], buf.shape[1]), fill)
                out[name] = torch.cat([buf, extra], 0)
        return out

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size)
        # batch statistics of a running sequence, applied to the buffers once at its end
        self._pending: list[tuple[str, int, Tensor, Tensor]] | None = None

    def _norm(self, v: Tensor, key: str, q: Params, t: int) -> Tensor:
        """Normalise v (B, F), or (S, B, F) for S steps from t, with per-step statistics."""
        if self.training:
            var, mean = torch.var_mean(v, dim=-2, keepdim=True, correction=0)
            if self._pending is not None and v.dim() == 2:
                self._pending.append((key, t, mean, var))
            else:
                self._update(q, key, t, mean.reshape(-1, mean.shape[-1]), var.reshape(-1, var.shape[-1]), v.shape[-2])
        else:
            mean_buf, var_buf = q[f"bn_{key}_mean"], q[f"bn_{key}_var"]
            last = mean_buf.shape[0] - 1
            if last < 0:  # never trained: mean 0, variance 1
                return v * (1.0 / (1.0 + EPS) ** 0.5)
            if v.dim() == 2:
                mean, var = mean_buf[min(t, last)], var_buf[min(t, last)]
            else:
                idx = torch.arange(t, t + v.shape[0], device=v.device).clamp_(max=last)
                mean, var = mean_buf[idx].unsqueeze(1), var_buf[idx].unsqueeze(1)
        return (v - mean) * torch.rsqrt(var + EPS)

    def _update(self, q: Params, key: str, t: int, mean: Tensor, var: Tensor, n: int) -> None:
        """Running statistics of steps t.. (rows of mean / var) with momentum; unbiased variance.
        (Under autocast the batch statistics come in bfloat16; the buffers keep their own dtype.)"""
        with torch.no_grad():
            rows = slice(t, t + mean.shape[0])
            run_mean, run_var = q[f"bn_{key}_mean"], q[f"bn_{key}_var"]
            run_mean[rows].lerp_(mean.detach().to(run_mean.dtype), self.momentum)
            unbiased = var.detach().to(run_var.dtype) * (n / (n - 1) if n > 1 else 1.0)
            run_var[rows].lerp_(unbiased, self.momentum)

    def has_kernel_for(self, x: Tensor) -> bool:
        return kernel_runs_on(x)

    def run(self, x: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        if not (self.training and self.uses_kernel(x) and x.shape[1] > 1):
            return super().run(x, state, q)
        running = tuple(q[f"bn_{k}_{s}"] for k in ("ih", "hh", "c") for s in ("mean", "var"))
        loop = _loop(x)
        if loop.batch_major_input:  # batch-major underneath, for one native_batch_norm over every step
            v = linear(x.transpose(0, 1), q["weight_ih"]).transpose(0, 1)
        else:  # the C++ loop normalises each step's rows itself: time-major
            v = linear(x, q["weight_ih"])
        hs, h, c = NormLSTMKernel.apply(
            v, q["bn_ih_weight"], q["bias_ih"] + q["bias_hh"], state[0], state[1], q["weight_hh"],
            q["bn_hh_weight"], q["bn_c_weight"], q["bn_c_bias"], StepNorm("batch", EPS, running, self.momentum),
            loop,
        )
        return hs, (h, c)

    def sequence(self, xw: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        if not self.training:
            return super().sequence(xw, state, q)
        self._pending = []
        try:
            result = super().sequence(xw, state, q)
            pending = self._pending
        finally:
            self._pending = None
        for key in ("hh", "c"):
            entries = [e for e in pending if e[0] == key]
            if entries:
                mean = torch.cat([e[2] for e in entries])
                var = torch.cat([e[3] for e in entries])
                self._update(q, key, entries[0][1], mean, var, xw.shape[1])
        return result

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        shift = q["bias_ih"] + q["bias_hh"]
        S, B = x.shape[:2]
        if self.training and B > 1:  # all S steps in one batch norm, projected batch-major
            v = linear(x.transpose(0, 1), q["weight_ih"]).transpose(0, 1)  # (S, B, K), batch-major underneath
            rows = slice(t0, t0 + S)
            return batch_norm_over_steps(
                v, q["bn_ih_weight"], shift, q["bn_ih_mean"][rows], q["bn_ih_var"][rows], self.momentum, EPS
            )[0]
        v = self._norm(linear(x, q["weight_ih"]), "ih", q, t0)
        return torch.addcmul(shift, v, q["bn_ih_weight"])

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h, c = state[0], state[1]
        hs = self.hidden_size
        gates = torch.addcmul(xw, self._norm(h @ q["weight_hh"].t(), "hh", q, t), q["bn_hh_weight"])
        c_new, named = _lstm_tail(gates, c, hs)
        c_hat = torch.addcmul(q["bn_c_bias"], self._norm(c_new, "c", q, t), q["bn_c_weight"])
        return (named["o"] * torch.tanh(c_hat), c_new), named
