"""The LSTM family on one configurable cell: LSTM, peephole LSTM and the gate-removal variants.

Every member is the peephole LSTM of Gers & Schmidhuber (2000) with parts switched off
(s = sigmoid, a_* = W_* x + U_* h + b_* for the gates present):

    i  = s(a_i + p_i * c)        (input gate; 1 when removed)
    f  = s(a_f + p_f * c)        (forget gate; 1 when removed, 1 - i when coupled)
    g  = tanh(a_g)               (identity for NIAF)
    c' = f * c + i * g
    o  = s(a_o + p_o * c')       (1 when removed)
    h' = o * tanh(c')            (o * c' for NOAF)

Parameter layout follows nn.LSTM: ``weight_ih`` [G*H, in], ``weight_hh`` [G*H, H], ``bias_ih``,
``bias_hh``, with the G blocks in nn.LSTM order i, f, g, o, a removed gate's block left out (so the
full LSTM is byte-for-byte nn.LSTM's layout). Peephole weights are the diagonal vectors
``peephole`` [P*H], blocks in order i, f, o for the sigmoid gates present. Peepholes start at zero,
so a fresh peephole cell computes exactly an LSTM and learns its peepholes from there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from charlm.cells.base import Cell, CellState, Gates, Params, standard_shapes
from charlm.cells.gate_config import GateConfig
from charlm.cells.lstm_kernel import GatedLSTMKernel, kernel_runs_on


class GatedLSTMCell(Cell):
    """Peephole LSTM with switchable gates (Gers & Schmidhuber 2000; Greff et al. 2017;
    Jozefowicz et al. 2015).

        i = s(W_i x + U_i h + b_i + p_i*c), f = s(W_f x + U_f h + b_f + p_f*c), g = tanh(W_g x + U_g h + b_g)
        c' = f*c + i*g,  o = s(W_o x + U_o h + b_o + p_o*c'),  h' = o*tanh(c')

    with a removed gate fixed to 1, CIFG's f = 1 - i, NIAF's g = identity, NOAF's h' = o*c'.
    With every gate and no peepholes this is exactly nn.LSTM (Hochreiter & Schmidhuber 1997,
    with the forget gate of Gers et al. 2000).
    """

    state_names = ("h", "c")

    def __init__(self, input_size: int, hidden_size: int, config: GateConfig | None = None) -> None:
        super().__init__(input_size, hidden_size)
        self.config = config or GateConfig()
        self.blocks = self.config.blocks
        self.peep_blocks = self.config.peep_blocks
        # the gates this variant has (CIFG's f = 1 - i counts), in the order i, f, g, o
        coupled = self.config.coupled
        self.gate_names = tuple(n for n in ("i", "f", "g", "o") if n in self.blocks or (n == "f" and coupled))

    def extra_repr(self) -> str:
        return f"blocks={''.join(self.blocks)}, peepholes={''.join(self.peep_blocks) or 'none'}"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        n = len(self.blocks)
        shapes = standard_shapes(n, n, self.input_size, self.hidden_size)
        if self.peep_blocks:
            shapes["peephole"] = (len(self.peep_blocks) * self.hidden_size,)
        return shapes

    def forget_block(self) -> tuple[int, float] | None:
        if "f" in self.blocks:
            return self.blocks.index("f"), 1.0
        if self.config.coupled:  # f = 1 - s(a_i) = s(-a_i): a forget bias b is an input bias -b
            return self.blocks.index("i"), -1.0
        return None

    def reset_parameters(self, p: Params, init: str, forget_bias: float) -> None:
        super().reset_parameters(p, init, forget_bias)
        if "peephole" in p:
            with torch.no_grad():
                p["peephole"].zero_()

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h, c = state[0], state[1]
        hs = self.hidden_size
        gates = torch.addmm(xw, h, q["weight_hh"].t())
        blk = {name: gates[:, k * hs : (k + 1) * hs] for k, name in enumerate(self.blocks)}
        peep = q.get("peephole")
        pk = {name: k for k, name in enumerate(self.peep_blocks)}

        def pre(name: str, cell: Tensor) -> Tensor:
            a = blk[name]
            if peep is not None and name in pk:
                a = a + peep[pk[name] * hs : (pk[name] + 1) * hs] * cell
            return a

        i = torch.sigmoid(pre("i", c)) if "i" in blk else None
        if "f" in blk:
            f: Tensor | None = torch.sigmoid(pre("f", c))
        elif self.config.coupled:
            assert i is not None
            f = 1.0 - i
        else:
            f = None
        g = torch.tanh(blk["g"]) if self.config.g_tanh else blk["g"]
        c_new = f * c if f is not None else c
        c_new = c_new + i * g if i is not None else c_new + g
        a = torch.tanh(c_new) if self.config.out_tanh else c_new
        o = torch.sigmoid(pre("o", c_new)) if "o" in blk else None
        h_new = o * a if o is not None else a
        named = {"i": i, "f": f, "g": g, "o": o}
        return (h_new, c_new), {n: v for n, v in named.items() if v is not None}

    def has_kernel_for(self, x: Tensor) -> bool:
        return kernel_runs_on(x)

    def run(self, x: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """The whole sequence in :class:`charlm.cells.lstm_kernel.GatedLSTMKernel` where it runs, else the
        autograd loop over :meth:`step`."""
        if not self.uses_kernel(x):
            return super().run(x, state, q)
        # FGR (a third state entry: the previous gates) also hands the kernel its gate recurrence
        gates0, w_gg = (state[2], q["weight_gg"]) if len(state) == 3 else (None, None)
        hs, *final = GatedLSTMKernel.apply(
            x, q["weight_ih"], q["bias_ih"] + q["bias_hh"], state[0], state[1], q["weight_hh"],
            q.get("peephole", x.new_empty(0)), self.config, gates0, w_gg,
        )
        return hs, tuple(final)


class GateRecurrentLSTMCell(GatedLSTMCell):
    """FGR: peephole LSTM with full gate recurrence (Greff et al. 2017, "LSTM: A Search Space Odyssey").

        [a_i, a_f, a_o] += R [i_prev, f_prev, o_prev]      (R = nine H x H matrices, ``weight_gg`` [3H, 3H])
        then the peephole LSTM above; the state carries the gate activations: (h, c, [i, f, o]).

    ``weight_gg`` rows are the receiving gates (i, f, o), columns the previous step's gates (i, f, o).
    It starts at zero (the cell begins as the peephole LSTM); the third state entry is (B, 3H).
    """

    state_names = ("h", "c", "gates")  # gates: the previous step's i, f, o

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size, GateConfig(peephole=True))

    def state_sizes(self) -> tuple[int, ...]:
        return (self.hidden_size, self.hidden_size, 3 * self.hidden_size)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = super().param_shapes()
        shapes["weight_gg"] = (3 * self.hidden_size, 3 * self.hidden_size)
        return shapes

    def reset_parameters(self, p: Params, init: str, forget_bias: float) -> None:
        super().reset_parameters(p, init, forget_bias)
        with torch.no_grad():
            p["weight_gg"].zero_()

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        h, c, prev = state
        hs = self.hidden_size
        rec = prev @ q["weight_gg"].t()  # (B, 3H): contributions to a_i, a_f, a_o
        # blocks are i, f, g, o: add the gate recurrence to i, f (first 2H) and o (last H)
        a_if = xw[:, : 2 * hs] + rec[:, : 2 * hs]
        a_o = xw[:, 3 * hs :] + rec[:, 2 * hs :]
        xw = torch.cat([a_if, xw[:, 2 * hs : 3 * hs], a_o], 1)
        gates = torch.addmm(xw, h, q["weight_hh"].t())
        peep = q["peephole"]
        i = torch.sigmoid(gates[:, :hs] + peep[:hs] * c)
        f = torch.sigmoid(gates[:, hs : 2 * hs] + peep[hs : 2 * hs] * c)
        g = torch.tanh(gates[:, 2 * hs : 3 * hs])
        c_new = f * c + i * g
        o = torch.sigmoid(gates[:, 3 * hs :] + peep[2 * hs :] * c_new)
        h_new = o * torch.tanh(c_new)
        return (h_new, c_new, torch.cat([i, f, o], 1)), {"i": i, "f": f, "g": g, "o": o}
