"""Gated recurrent units, in nn.GRU's form and in Cho et al.'s original form.

Parameter layout follows nn.GRU: ``weight_ih`` [3H, in], ``weight_hh`` [3H, H], ``bias_ih``,
``bias_hh``, blocks in order r, z, n.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.base import Cell, CellState, Gates, Params, standard_shapes
from charlm.cells.lstm_kernel import kernel_runs_on
from charlm.cells.onednn_matmul import linear
from charlm.cells.reset_gate_kernel import GateProduct, GRUKernel, ResetGateKernel, ResetGateSpec

# Cho's form in the reset-gate kernel: r and z both see h through one product (blocks r, z, n)
CHO_KERNEL = ResetGateSpec(z_block=1, r_block=0, products=(GateProduct((0, 2), 0),), cand_row=2, z_keeps_h=True)


class GRUCell(Cell):
    """Gated recurrent unit (Cho et al. 2014, "Learning Phrase Representations using RNN
    Encoder-Decoder for Statistical Machine Translation").

    nn.GRU form (``reset_inside=False``, the default cell ``gru``):
        r = s(W_r x + b_ir + U_r h + b_hr),  z = s(W_z x + b_iz + U_z h + b_hz)
        n = tanh(W_n x + b_in + r * (U_n h + b_hn)),  h' = (1 - z) * n + z * h
    Cho et al.'s form (``reset_inside=True``, cell ``gru-cho``): the reset gate acts before the
    matmul, n = tanh(W_n x + b_in + U_n (r * h) + b_hn); the rest is unchanged.
    """

    gate_names = ("r", "z", "n")

    def __init__(self, input_size: int, hidden_size: int, *, reset_inside: bool = False) -> None:
        super().__init__(input_size, hidden_size)
        self.reset_inside = reset_inside

    def extra_repr(self) -> str:
        return f"reset_inside={self.reset_inside}"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return standard_shapes(3, 3, self.input_size, self.hidden_size)

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        h = self.hidden_size
        b_hh = q["bias_hh"]
        # Cho's form has every bias outside r; in nn.GRU's, b_hn is multiplied by r, so only b_hr
        # and b_hz fold into the projection
        folded = b_hh if self.reset_inside else torch.cat([b_hh[: 2 * h], b_hh.new_zeros(h)])
        return linear(x, q["weight_ih"], q["bias_ih"] + folded)

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h = state[0]
        hs = self.hidden_size
        w_hh = q["weight_hh"]
        if self.reset_inside:
            rz = torch.sigmoid(torch.addmm(xw[:, : 2 * hs], h, w_hh[: 2 * hs].t()))
            r, z = rz[:, :hs], rz[:, hs:]
            n = torch.tanh(torch.addmm(xw[:, 2 * hs :], r * h, w_hh[2 * hs :].t()))
        else:
            hw = h @ w_hh.t()
            rz = torch.sigmoid(xw[:, : 2 * hs] + hw[:, : 2 * hs])
            r, z = rz[:, :hs], rz[:, hs:]
            n = torch.tanh(xw[:, 2 * hs :] + r * (hw[:, 2 * hs :] + q["bias_hh"][2 * hs :]))
        return (n + z * (h - n),), {"r": r, "z": z, "n": n}

    def has_kernel_for(self, x: Tensor) -> bool:
        return kernel_runs_on(x)

    def sequence(self, xw: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """The whole sequence in a hand-written kernel where it runs; else the autograd loop."""
        if not self.uses_kernel(xw):
            return super().sequence(xw, state, q)
        if self.reset_inside:
            hs, h = ResetGateKernel.apply(xw, state[0], q["weight_hh"], CHO_KERNEL)
        else:
            hs, h = GRUKernel.apply(xw, state[0], q["weight_hh"], q["bias_hh"][2 * self.hidden_size :])
        return hs, (h,)
