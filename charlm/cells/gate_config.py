"""``GateConfig``: which parts of the peephole LSTM a variant of the LSTM family keeps.

The equations are in :mod:`charlm.cells.lstm`; the cell, its kernel (:mod:`charlm.cells.lstm_kernel`), the
registry and the C++ step all read this one description. It imports nothing, so the registry can name the
variants without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateConfig:
    """Which parts of the peephole LSTM a variant keeps (the equations: :mod:`charlm.cells.lstm`)."""

    input_gate: bool = True
    forget_gate: bool = True
    output_gate: bool = True
    coupled: bool = False  # CIFG: f = 1 - i (needs the input gate, has no forget block)
    g_tanh: bool = True  # False: NIAF, g = a_g
    out_tanh: bool = True  # False: NOAF, h' = o * c'
    peephole: bool = False

    @property
    def blocks(self) -> tuple[str, ...]:
        """Gate blocks present in ``weight_ih`` / ``weight_hh``, in nn.LSTM order."""
        out = []
        if self.input_gate:
            out.append("i")
        if self.forget_gate and not self.coupled:
            out.append("f")
        out.append("g")
        if self.output_gate:
            out.append("o")
        return tuple(out)

    @property
    def peep_blocks(self) -> tuple[str, ...]:
        """Gates that receive a peephole, in order i, f, o."""
        if not self.peephole:
            return ()
        return tuple(b for b in self.blocks if b != "g")
