"""Single-matrix recurrences: the tanh RNN, the IRNN and the linear state-space cell.

Parameter layout follows nn.RNN: ``weight_ih`` [H, in], ``weight_hh`` [H, H], ``bias_ih``, ``bias_hh``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.base import Cell, CellState, Params, standard_shapes


class ElmanCell(Cell):
    """Simple recurrent network (Elman 1990): h' = tanh(W x + U h + b_ih + b_hh), nn.RNN's tanh cell.

    With ``relu=True`` and ``identity_init=True`` this is the IRNN of Le, Jaitly & Hinton 2015,
    "A Simple Way to Initialize Recurrent Networks of Rectified Linear Units":
    h' = relu(W x + U h + b) with U initialised to the identity and b to zero.
    """

    def __init__(
        self, input_size: int, hidden_size: int, *, relu: bool = False, identity_init: bool = False
    ) -> None:
        super().__init__(input_size, hidden_size)
        self.relu = relu
        self.identity_init = identity_init

    def extra_repr(self) -> str:
        return f"nonlinearity={'relu' if self.relu else 'tanh'}"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return standard_shapes(1, 1, self.input_size, self.hidden_size)

    def reset_parameters(self, p: Params, init: str, forget_bias: float) -> None:
        super().reset_parameters(p, init, forget_bias)
        if self.identity_init:
            with torch.no_grad():
                p["weight_hh"].copy_(torch.eye(self.hidden_size))

    def step(self, xw: Tensor, state: CellState, q: Params, t: int) -> CellState:
        a = torch.addmm(xw, state[0], q["weight_hh"].t())
        return (torch.relu(a) if self.relu else torch.tanh(a),)


class LinearCell(Cell):
    """Linear state-space recurrence, the state update of the Kalman filter (Kalman 1960, "A New
    Approach to Linear Filtering and Prediction Problems"): h' = A h + B x + b.

    ``weight_hh`` is A [H, H], ``weight_ih`` is B [H, in], b = ``bias_ih`` + ``bias_hh`` (nn.RNN
    layout). A starts orthogonal (every eigenvalue on the unit circle: neither decaying nor
    exploding); there is no nonlinearity, so keep gradient clipping on.
    """

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return standard_shapes(1, 1, self.input_size, self.hidden_size)

    def step(self, xw: Tensor, state: CellState, q: Params, t: int) -> CellState:
        return (torch.addmm(xw, state[0], q["weight_hh"].t()),)
