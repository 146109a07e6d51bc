"""sLSTM, the scalar-memory cell of xLSTM (Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer,
Brandstetter & Hochreiter 2024, "xLSTM: Extended Long Short-Term Memory", arXiv 2405.04517).

An LSTM with an exponential input gate and a normaliser: the cell state c and the normaliser n are both
sums of the inputs weighted by the same gates, and the output reads their ratio, so a large input gate
can overwrite the memory without the state growing without bound. exp overflows float32 past 88, so the
cell carries a stabiliser m (the running maximum of the log gates) and keeps c and n divided by exp(m);
h, the ratio, is unchanged by that scaling.

Choices (the paper allows several):

- the forget gate is a sigmoid, log f = log s(a_f) (the official implementation's default; the paper
  also allows exp(a_f)): f <= 1, so the memory cannot grow from one step to the next without input;
- one head: the recurrent matrices are full H x H blocks (the paper's block-diagonal heads are a
  speed-up of the same recurrence);
- a fresh state (n = 0, the zeros every window of a new stream starts from) sets m to a_i, as the
  official code does, so that the first step's i' = 1 and n = 1; afterwards n >= 1 at every step (one of
  f', i' is 1 and the other does not lower n), so c / n is always defined.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from charlm.cells.base import Cell, CellState, Gates, Params, standard_shapes


class SLSTMCell(Cell):
    """sLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"), one head, sigmoid forget gate:

        [a_i, a_f, a_z, a_o] = W x + R h + b                          (blocks in that order, as nn.LSTM's i f g o)
        m' = max(log s(a_f) + m, a_i)                                  (m' = a_i for a fresh state, n = 0)
        i = exp(a_i - m'),  f = exp(log s(a_f) + m - m')               (the stabilised gates, in [0, 1])
        c' = f * c + i * tanh(a_z),  n' = f * n + i,  h' = s(a_o) * c' / n'

    The state is (h, c, n, m). Without the stabiliser, i = exp(a_i) and f = s(a_f): c and n above are
    those times exp(-m'), so h' is the same. Parameters are nn.LSTM's (``weight_ih``, ``weight_hh``,
    ``bias_ih``, ``bias_hh``); the forget bias starts b_f. Gates reported: the stabilised i and f, the
    cell input g = tanh(a_z) (the paper's z) and o.
    """

    state_names = ("h", "c", "n", "m")
    gate_names = ("i", "f", "g", "o")

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return standard_shapes(4, 4, self.input_size, self.hidden_size)

    def forget_block(self) -> tuple[int, float] | None:
        return (1, 1.0)

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h, c, n, m = state
        a_i, a_f, a_z, a_o = torch.addmm(xw, h, q["weight_hh"].t()).chunk(4, 1)
        log_f_m = m - F.softplus(-a_f)  # log s(a_f) + m
        carried = n > 0  # False for a fresh state: nothing to carry, m' = a_i
        m_new = torch.where(carried, torch.maximum(log_f_m, a_i), a_i)
        i = torch.exp(a_i - m_new)
        # <= 1 where carried; a fresh state's f is 0 (clamped first: exp of a large value times 0 is NaN)
        f = torch.exp((log_f_m - m_new).clamp(max=0.0)) * carried.to(a_f.dtype)
        g, o = torch.tanh(a_z), torch.sigmoid(a_o)
        c_new = f * c + i * g
        n_new = f * n + i
        return (o * c_new / n_new, c_new, n_new, m_new), {"i": i, "f": f, "g": g, "o": o}
