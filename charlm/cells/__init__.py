"""The cell zoo: every recurrent cell charlm can train, by name.

``CELLS`` maps a name to its :class:`CellSpec`; :func:`get_cell` resolves a name (with a clear
error for unknown ones). The order of ``CELLS`` is the listing order of ``charlm cells``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from charlm.cells.base import Cell, CellSpec
from charlm.cells.gru import GRUCell
from charlm.cells.lstm import GateConfig, GatedLSTMCell, GateRecurrentLSTMCell
from charlm.cells.mogrifier import MogrifierLSTMCell
from charlm.cells.mut_cells import MUT1Cell, MUT2Cell, MUT3Cell
from charlm.cells.norm_lstm import BatchNormLSTMCell, LayerNormLSTMCell
from charlm.cells.rnn import ElmanCell, LinearCell

__all__ = ["CELLS", "Cell", "CellSpec", "cell_names", "describe_cells", "get_cell"]

_HOCHREITER = "Hochreiter & Schmidhuber 1997; forget gate: Gers, Schmidhuber & Cummins 2000"
_GERS = "Gers & Schmidhuber 2000, 'Recurrent nets that time and count'"
_GREFF = "Greff et al. 2017, 'LSTM: A Search Space Odyssey'"
_JOZ = "Jozefowicz, Zaremba & Sutskever 2015, 'An Empirical Exploration of Recurrent Network Architectures'"


def _gated(**kw: bool) -> partial[Cell]:
    return partial(GatedLSTMCell, config=GateConfig(**kw))


def _spec(
    name: str, summary: str, paper: str, num_states: int, build: Callable[..., Cell],
    torch_rnn: str | None = None, forget_bias: float | None = None, options: tuple[str, ...] = (),
) -> CellSpec:
    return CellSpec(name, summary, paper, num_states, build, torch_rnn, forget_bias, options)


_SPECS = [
    _spec("rnn", "tanh RNN: h' = tanh(W x + U h + b)", "Elman 1990, 'Finding structure in time'", 1,
          ElmanCell, torch_rnn="RNN_TANH"),
    _spec("irnn", "ReLU RNN, U initialised to the identity, b = 0", "Le, Jaitly & Hinton 2015", 1,
          partial(ElmanCell, relu=True, identity_init=True), torch_rnn="RNN_RELU"),
    _spec("linear", "linear state-space recurrence: h' = A h + B x + b", "Kalman 1960 (state update)", 1,
          LinearCell),
    _spec("lstm", "LSTM as nn.LSTM (gates i, f, g, o; no peepholes)", _HOCHREITER, 2, _gated(),
          torch_rnn="LSTM"),
    _spec("peephole", "LSTM with diagonal peepholes p_i*c, p_f*c, p_o*c'", _GERS, 2, _gated(peephole=True)),
    _spec("gru", "GRU as nn.GRU: n = tanh(W_n x + r*(U_n h + b_hn))", "Cho et al. 2014 (nn.GRU form)", 1,
          GRUCell, torch_rnn="GRU"),
    _spec("gru-cho", "GRU with the reset inside the matmul: n = tanh(W_n x + U_n(r*h))",
          "Cho et al. 2014, 'Learning Phrase Representations using RNN Encoder-Decoder'", 1,
          partial(GRUCell, reset_inside=True)),
    _spec("lstm-ln", "layer-normalised LSTM: LN(Wx) + LN(Uh) + b, h' = o*tanh(LN(c'))",
          "Ba, Kiros & Hinton 2016, 'Layer Normalization'", 2, LayerNormLSTMCell),
    _spec("lstm-bn", "recurrent batch-norm LSTM, per-time-step statistics, gains 0.1",
          "Cooijmans et al. 2016, 'Recurrent Batch Normalization'", 2, BatchNormLSTMCell),
    _spec("mogrifier", "Mogrifier LSTM: x, h gate each other for r rounds (2 s(Q h) * x, ...), then the LSTM",
          "Melis, Kocisky & Blunsom 2020, 'Mogrifier LSTM'", 2, MogrifierLSTMCell,
          options=("mogrifier_rounds", "mogrifier_rank")),
    # Jozefowicz et al. 2015
    _spec("lstm-f", "LSTM without forget gate (f = 1)", _JOZ, 2, _gated(forget_gate=False)),
    _spec("lstm-i", "LSTM without input gate (i = 1)", _JOZ, 2, _gated(input_gate=False)),
    _spec("lstm-o", "LSTM without output gate (o = 1)", _JOZ, 2, _gated(output_gate=False)),
    _spec("lstm-b", "LSTM with forget-gate bias initialised to 1", _JOZ, 2, _gated(), torch_rnn="LSTM",
          forget_bias=1.0),
    _spec("mut1", "MUT1: z = s(Wz x), h' = tanh(Uh(r*h) + tanh(Px)) z + h(1-z)", _JOZ, 1, MUT1Cell),
    _spec("mut2", "MUT2: r = s(Px + Ur h), h' = tanh(Uh(r*h) + Wh x) z + h(1-z)", _JOZ, 1, MUT2Cell),
    _spec("mut3", "MUT3: z = s(Wz x + Uz tanh(h)), h' = tanh(Uh(r*h) + Wh x) z + h(1-z)", _JOZ, 1, MUT3Cell),
    # Greff et al. 2017, on the peephole LSTM
    _spec("nig", "peephole LSTM, no input gate (i = 1)", _GREFF, 2,
          _gated(peephole=True, input_gate=False)),
    _spec("nfg", "peephole LSTM, no forget gate (f = 1)", _GREFF, 2,
          _gated(peephole=True, forget_gate=False)),
    _spec("nog", "peephole LSTM, no output gate (o = 1)", _GREFF, 2,
          _gated(peephole=True, output_gate=False)),
    _spec("niaf", "peephole LSTM, no input activation (g = a_g)", _GREFF, 2,
          _gated(peephole=True, g_tanh=False)),
    _spec("noaf", "peephole LSTM, no output activation (h' = o*c')", _GREFF, 2,
          _gated(peephole=True, out_tanh=False)),
    _spec("np", "LSTM without peepholes (the same model as lstm)", _GREFF, 2, _gated(), torch_rnn="LSTM"),
    _spec("cifg", "peephole LSTM, coupled input and forget gate (f = 1 - i)", _GREFF, 2,
          _gated(peephole=True, forget_gate=False, coupled=True)),
    _spec("fgr", "peephole LSTM, full gate recurrence (R [i,f,o] of the previous step)", _GREFF, 3,
          GateRecurrentLSTMCell),
]

CELLS: dict[str, CellSpec] = {s.name: s for s in _SPECS}


def cell_names() -> list[str]:
    """Every cell name, in listing order."""
    return list(CELLS)


def describe_cells() -> list[tuple[str, str]]:
    """(name, one-line summary) for every cell, in listing order (for ``charlm cells``)."""
    return [(s.name, s.summary) for s in CELLS.values()]


def get_cell(name: str) -> CellSpec:
    """The spec for ``name``, spelled as :func:`charlm.config.cell_registry_names` allows (which raises,
    listing the valid names, for an unknown one)."""
    from charlm.config import cell_registry_names

    return CELLS[cell_registry_names([name])[0]]
