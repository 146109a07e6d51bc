"""The Mogrifier LSTM (Melis, Kočiský & Blunsom 2020, "Mogrifier LSTM", ICLR 2020).

Before the usual LSTM step the input and the previous output gate each other for r rounds; the LSTM then
runs on the gated pair. The gating of a step depends on that step's h, so it runs inside the time loop:
the input projection W x cannot be done for all steps at once as in the other LSTMs. For r = 0 the cell
is exactly ``lstm`` and runs its hand-written kernel (:mod:`charlm.cells.lstm_kernel`); for r > 0 its own,
:mod:`charlm.cells.mogrifier_kernel`; under autocast (or ``model.compile=true``) the engine's autograd
loop over :meth:`MogrifierLSTMCell.step`.

Per round a step needs one product and two element-wise ops: 2 s(a) = 1 + tanh(a / 2), so
x' = 2 s(Q h) * x is ``addcmul(x, x, tanh((Q / 2) h))``, with the halved matrix formed once per call
(:meth:`MogrifierLSTMCell.prepare`), as is the product Q_left Q_right of a factorised matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.base import CellState, Gates, Params, init_input_block
from charlm.cells.gate_config import GateConfig
from charlm.cells.lstm import GatedLSTMCell
from charlm.cells.mogrifier_kernel import MogrifierKernel


class MogrifierLSTMCell(GatedLSTMCell):
    """Mogrifier LSTM (Melis, Kočiský & Blunsom 2020, "Mogrifier LSTM", ICLR 2020): for i = 1 .. r,

        x = 2 s(Q^i h) * x    (i odd),        h = 2 s(R^i x) * h    (i even)

    then the LSTM of nn.LSTM on the gated (x, h):

        [a_i, a_f, a_g, a_o] = W x + U h + b,  c' = s(a_f) * c + s(a_i) * tanh(a_g),  h' = s(a_o) * tanh(c')

    The state carried to the next step is (h', c'); the gated h only enters this step's LSTM.
    r = 0 is exactly ``lstm``. The LSTM's parameters are nn.LSTM's (``weight_ih``, ``weight_hh``,
    ``bias_ih``, ``bias_hh``, blocks i, f, g, o); round i adds ``mogrifier_q{i}`` [in, H] (odd i) or
    ``mogrifier_r{i}`` [H, in] (even i), or with rank k > 0 the factors ``..._left`` [rows, k] and
    ``..._right`` [k, columns] whose product is that matrix. Each matrix (each factor) starts as an input
    block of ``model.init``, so at the start every 2 s(.) is near 1 and the cell near an LSTM.
    """

    def __init__(self, input_size: int, hidden_size: int, mogrifier_rounds: int = 5, mogrifier_rank: int = 0) -> None:
        super().__init__(input_size, hidden_size, GateConfig())
        self.rounds = mogrifier_rounds
        self.rank = mogrifier_rank

    def extra_repr(self) -> str:
        return f"rounds={self.rounds}, rank={self.rank or 'full'}"

    def _round_shapes(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, shape) of each round's matrix: Q^i [in, H] for odd i, R^i [H, in] for even i."""
        m, n = self.input_size, self.hidden_size
        rounds = range(1, self.rounds + 1)
        return [(f"mogrifier_q{i}", (m, n)) if i % 2 else (f"mogrifier_r{i}", (n, m)) for i in rounds]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().param_shapes()
        for name, (rows, cols) in self._round_shapes():
            if self.rank:
                shapes[f"{name}_left"], shapes[f"{name}_right"] = (rows, self.rank), (self.rank, cols)
            else:
                shapes[name] = (rows, cols)
        return shapes

    def reset_parameters(self, p: Params, init: str, forget_bias: float) -> None:
        super().reset_parameters(p, init, forget_bias)
        with torch.no_grad():
            for name, _ in self._round_shapes():
                for part in ((f"{name}_left", f"{name}_right") if self.rank else (name,)):
                    init_input_block(p[part], init)

    def run(self, x: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """r = 0: the LSTM's kernel; else :class:`charlm.cells.mogrifier_kernel.MogrifierKernel` where it runs,
        else the autograd loop over :meth:`step`."""
        if not self.rounds or not self.uses_kernel(x):
            return super().run(x, state, q)
        mats = [q[f"half_{name}"] for name, _ in self._round_shapes()]
        hs, h, c = MogrifierKernel.apply(x, state[0], state[1], q["weight_ih"], q["bias"], q["weight_hh"], *mats)
        return hs, (h, c)

    def prepare(self, p: Params) -> Params:
        """Each round's matrix, halved (2 s(a) = 1 + tanh(a / 2)) and multiplied out where factorised, under
        ``half_{name}``; the two biases summed under ``bias``."""
        if not self.rounds:
            return p
        q = dict(p)
        for name, _ in self._round_shapes():
            full = p[f"{name}_left"] @ p[f"{name}_right"] if self.rank else p[name]
            q[f"half_{name}"] = 0.5 * full
        q["bias"] = p["bias_ih"] + p["bias_hh"]
        return q

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        """W x + b for every step when r = 0; with rounds the steps take x itself (W x needs the gated x)."""
        return super().project(x, q, t0) if not self.rounds else x

    def mogrify(self, x: Tensor, h: Tensor, q: Params) -> tuple[Tensor, Tensor]:
        """The r rounds on x (B, in) and h (B, H): the gated pair."""
        for i, (name, _) in enumerate(self._round_shapes(), 1):
            if i % 2:
                x = torch.addcmul(x, x, torch.tanh(h @ q[f"half_{name}"].t()))
            else:
                h = torch.addcmul(h, h, torch.tanh(x @ q[f"half_{name}"].t()))
        return x, h

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        if not self.rounds:
            return super().step_gates(xw, state, q, t)
        x, h = self.mogrify(xw, state[0], q)
        gates = torch.addmm(torch.addmm(q["bias"], x, q["weight_ih"].t()), h, q["weight_hh"].t())
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * state[1] + i * g
        return (o * torch.tanh(c), c), {"i": i, "f": f, "g": g, "o": o}
