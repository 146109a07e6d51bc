"""MUT1-3: the three best architectures of Jozefowicz, Zaremba & Sutskever 2015,
"An Empirical Exploration of Recurrent Network Architectures".

MUT1 and MUT2 use the bare input (tanh(x), x) where a width-H vector is needed, which only makes sense
when dim x = dim h. Here x is first projected to H: x~ = P x + b_p, with P a learned [H, in] block of
``weight_ih`` (initialised like every input block), and x~ stands wherever the paper writes x bare.

Layout: ``weight_ih`` [3H, in], ``bias_ih`` [3H]; ``weight_hh`` [2H or 3H, H], ``bias_hh`` alike; the
block order is given per cell. Biases that the equations add outside a nonlinearity are folded into
the input projection once per call.

All three train through the hand-written kernel of :mod:`charlm.cells.reset_gate_kernel` where it runs
(float32 or float64 outside autocast, the step not compiled); each cell's ``KERNEL`` says where its pieces
sit. Elsewhere the autograd loop runs :meth:`step_gates`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.base import Cell, CellState, Gates, Params, standard_shapes
from charlm.cells.lstm_kernel import kernel_runs_on
from charlm.cells.onednn_matmul import linear
from charlm.cells.reset_gate_kernel import GateProduct, ResetGateKernel, ResetGateSpec


class _MUTCell(Cell):
    """What MUT1-3 share: gates z, r, n (in that order in the projection), and the reset-gate kernel."""

    gate_names = ("z", "r", "n")
    KERNEL: ResetGateSpec

    def has_kernel_for(self, x: Tensor) -> bool:
        return kernel_runs_on(x)

    def sequence(self, xw: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """The whole sequence in the reset-gate kernel where it runs; else the autograd loop."""
        if not self.uses_kernel(xw):
            return super().sequence(xw, state, q)
        hs, h = ResetGateKernel.apply(xw, state[0], q["weight_hh"], self.KERNEL)
        return hs, (h,)


class MUT1Cell(_MUTCell):
    """MUT1 (Jozefowicz et al. 2015):

        z = s(W_z x + b_z),  r = s(W_r x + U_r h + b_r)
        h' = tanh(U_h (r * h) + tanh(x~) + b_h) * z + h * (1 - z),   x~ = P x + b_p

    ``weight_ih`` blocks (z, r, P); ``weight_hh`` blocks (U_r, U_h); ``bias_hh`` blocks (r, h).
    """

    KERNEL = ResetGateSpec(z_block=0, r_block=1, products=(GateProduct((0, 1), 1),), cand_row=1, z_keeps_h=False)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return standard_shapes(3, 2, self.input_size, self.hidden_size)

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        h = self.hidden_size
        xw = linear(x, q["weight_ih"], q["bias_ih"])
        b_hh = q["bias_hh"]
        u = torch.tanh(xw[..., 2 * h :]) + b_hh[h:]
        return torch.cat([xw[..., :h], xw[..., h : 2 * h] + b_hh[:h], u], -1)

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h = state[0]
        hs = self.hidden_size
        w_hh = q["weight_hh"]
        z = torch.sigmoid(xw[:, :hs])
        r = torch.sigmoid(torch.addmm(xw[:, hs : 2 * hs], h, w_hh[:hs].t()))
        n = torch.tanh(torch.addmm(xw[:, 2 * hs :], r * h, w_hh[hs:].t()))
        return (h + z * (n - h),), {"z": z, "r": r, "n": n}


class _ThreeByThreeCell(_MUTCell):
    """MUT2 and MUT3: one state, three input blocks and three recurrent blocks."""

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return standard_shapes(3, 3, self.input_size, self.hidden_size)


class MUT2Cell(_ThreeByThreeCell):
    """MUT2 (Jozefowicz et al. 2015):

        z = s(W_z x + U_z h + b_z),  r = s(x~ + U_r h + b_r)
        h' = tanh(U_h (r * h) + W_h x + b_h) * z + h * (1 - z),   x~ = P x + b_p

    ``weight_ih`` blocks (z, P, W_h); ``weight_hh`` blocks (U_z, U_r, U_h); ``bias_hh`` likewise.
    """

    KERNEL = ResetGateSpec(z_block=0, r_block=1, products=(GateProduct((0, 2), 0),), cand_row=2, z_keeps_h=False)

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h = state[0]
        hs = self.hidden_size
        w_hh = q["weight_hh"]
        zr = torch.sigmoid(torch.addmm(xw[:, : 2 * hs], h, w_hh[: 2 * hs].t()))
        z, r = zr[:, :hs], zr[:, hs:]
        n = torch.tanh(torch.addmm(xw[:, 2 * hs :], r * h, w_hh[2 * hs :].t()))
        return (h + z * (n - h),), {"z": z, "r": r, "n": n}


class MUT3Cell(_ThreeByThreeCell):
    """MUT3 (Jozefowicz et al. 2015):

        z = s(W_z x + U_z tanh(h) + b_z),  r = s(W_r x + U_r h + b_r)
        h' = tanh(U_h (r * h) + W_h x + b_h) * z + h * (1 - z)

    ``weight_ih`` blocks (W_z, W_r, W_h); ``weight_hh`` blocks (U_z, U_r, U_h); ``bias_hh`` likewise.
    (MUT3 never uses the bare input, so it needs no projection.)
    """

    KERNEL = ResetGateSpec(
        z_block=0, r_block=1, products=(GateProduct((0, 1), 0, tanh_h=True), GateProduct((1, 2), 1)), cand_row=2,
        z_keeps_h=False,
    )

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h = state[0]
        hs = self.hidden_size
        w_hh = q["weight_hh"]
        z = torch.sigmoid(torch.addmm(xw[:, :hs], torch.tanh(h), w_hh[:hs].t()))
        r = torch.sigmoid(torch.addmm(xw[:, hs : 2 * hs], h, w_hh[hs : 2 * hs].t()))
        n = torch.tanh(torch.addmm(xw[:, 2 * hs :], r * h, w_hh[2 * hs :].t()))
        return (h + z * (n - h),), {"z": z, "r": r, "n": n}
