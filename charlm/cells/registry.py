"""The cell zoo: every recurrent cell charlm can train, by name.

``CELLS`` maps a name to its :class:`CellSpec`; :func:`get_cell` resolves a name and
:func:`cell_registry_names` checks names as users spell them. The order of ``CELLS`` is the listing order
of ``charlm cells``.

This module imports no torch: ``charlm cells`` and the config's checks read it at once. A spec names its
cell's class by module and name, imported when :meth:`CellSpec.build` first makes one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from charlm.cells.gate_config import GateConfig
from charlm.util.errors import CharlmError

if TYPE_CHECKING:
    from charlm.cells.base import Cell


@dataclass(frozen=True)
class CellClass:
    """A cell's class in ``charlm.cells.<module>`` and the keyword arguments every instance gets."""

    module: str
    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self, input_size: int, hidden_size: int, **options: Any) -> Cell:
        cls = getattr(importlib.import_module(f"charlm.cells.{self.module}"), self.name)
        return cls(input_size, hidden_size, **dict(self.kwargs), **options)  # type: ignore[no-any-return]


def _cell(module: str, name: str, **kwargs: Any) -> CellClass:
    return CellClass(module, name, tuple(kwargs.items()))


def _gated(**parts: bool) -> CellClass:
    """A member of the LSTM family (:class:`charlm.cells.lstm.GatedLSTMCell`) with these parts."""
    return _cell("lstm", "GatedLSTMCell", config=GateConfig(**parts))


@dataclass(frozen=True)
class CellSpec:
    """Registry entry for one cell name.

    ``build(input_size, hidden_size, **options)`` makes the cell. ``torch_rnn`` names the torch RNN kernel
    (the ATen op behind nn.LSTM / nn.GRU / nn.RNN, by nn.RNNBase's mode: "LSTM", "GRU", "RNN_TANH",
    "RNN_RELU") that computes exactly this cell, or is None; ``forget_bias`` forces the forget-gate bias
    initialisation (lstm-b); ``options`` names the :class:`charlm.config.ModelConfig` keys of this cell alone,
    which ``build`` takes as keyword arguments (``mogrifier_rounds``, ``mogrifier_rank``). ``kernel_first_on_cpu``:
    the cell's hand-written kernel is faster than its torch RNN op on a CPU for batches of more than one row
    (``gru``: docs/results.md, "Cells"), so a layer runs the kernel there even with ``model.torch_rnn=true``.
    """

    name: str
    summary: str
    paper: str
    num_states: int
    build: Callable[..., Cell] = field(repr=False, compare=False)  # (input_size, hidden_size, **options)
    torch_rnn: str | None = None
    forget_bias: float | None = None
    options: tuple[str, ...] = ()
    kernel_first_on_cpu: bool = False


def _spec(
    name: str, summary: str, paper: str, num_states: int, build: Callable[..., Cell],
    torch_rnn: str | None = None, forget_bias: float | None = None, options: tuple[str, ...] = (),
    kernel_first_on_cpu: bool = False,
) -> CellSpec:
    return CellSpec(name, summary, paper, num_states, build, torch_rnn, forget_bias, options, kernel_first_on_cpu)


_HOCHREITER = "Hochreiter & Schmidhuber 1997; forget gate: Gers, Schmidhuber & Cummins 2000"
_GERS = "Gers & Schmidhuber 2000, 'Recurrent nets that time and count'"
_GREFF = "Greff et al. 2017, 'LSTM: A Search Space Odyssey'"
_JOZ = "Jozefowicz, Zaremba & Sutskever 2015, 'An Empirical Exploration of Recurrent Network Architectures'"
_FENG = "Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, 'Were RNNs All We Needed?' (arXiv 2410.01201)"
_BECK = "Beck et al. 2024, 'xLSTM: Extended Long Short-Term Memory' (arXiv 2405.04517)"


_SPECS = [
    _spec("rnn", "tanh RNN: h' = tanh(W x + U h + b)", "Elman 1990, 'Finding structure in time'", 1,
          _cell("rnn", "ElmanCell"), torch_rnn="RNN_TANH"),
    _spec("irnn", "ReLU RNN, U initialised to the identity, b = 0", "Le, Jaitly & Hinton 2015", 1,
          _cell("rnn", "ElmanCell", relu=True, identity_init=True), torch_rnn="RNN_RELU"),
    _spec("linear", "linear state-space recurrence: h' = A h + B x + b", "Kalman 1960 (state update)", 1,
          _cell("rnn", "LinearCell")),
    _spec("lstm", "LSTM as nn.LSTM (gates i, f, g, o; no peepholes)", _HOCHREITER, 2, _gated(),
          torch_rnn="LSTM"),
    _spec("peephole", "LSTM with diagonal peepholes p_i*c, p_f*c, p_o*c'", _GERS, 2, _gated(peephole=True)),
    _spec("gru", "GRU as nn.GRU: n = tanh(W_n x + r*(U_n h + b_hn))", "Cho et al. 2014 (nn.GRU form)", 1,
          _cell("gru", "GRUCell"), torch_rnn="GRU", kernel_first_on_cpu=True),
    _spec("gru-cho", "GRU with the reset inside the matmul: n = tanh(W_n x + U_n(r*h))",
          "Cho et al. 2014, 'Learning Phrase Representations using RNN Encoder-Decoder'", 1,
          _cell("gru", "GRUCell", reset_inside=True)),
    _spec("lstm-ln", "layer-normalised LSTM: LN(Wx) + LN(Uh) + b, h' = o*tanh(LN(c'))",
          "Ba, Kiros & Hinton 2016, 'Layer Normalization'", 2, _cell("norm_lstm", "LayerNormLSTMCell")),
    _spec("lstm-bn", "recurrent batch-norm LSTM, per-time-step statistics, gains 0.1",
          "Cooijmans et al. 2016, 'Recurrent Batch Normalization'", 2, _cell("norm_lstm", "BatchNormLSTMCell")),
    _spec("mogrifier", "Mogrifier LSTM: x, h gate each other for r rounds (2 s(Q h) * x, ...), then the LSTM",
          "Melis, Kocisky & Blunsom 2020, 'Mogrifier LSTM'", 2, _cell("mogrifier", "MogrifierLSTMCell"),
          options=("mogrifier_rounds", "mogrifier_rank")),
    # the recurrent cells of 2024
    _spec("mingru", "minGRU: z = s(W_z x), h' = (1-z)*h + z*g(W_h x), g(v) = v+1/2 (v >= 0) else s(v); "
          "no h in the gate: trained by a parallel scan", _FENG, 1, _cell("min_rnn", "MinGRUCell")),
    _spec("minlstm", "minLSTM: f = s(W_f x), i = s(W_i x), h' = (f*h + i*g(W_h x)) / (f+i); "
          "no h in the gates: trained by a parallel scan", _FENG, 1, _cell("min_rnn", "MinLSTMCell")),
    _spec("slstm", "sLSTM (xLSTM): i = exp(a_i), f = s(a_f), c' = f*c + i*tanh(a_z), n' = f*n + i, "
          "h' = s(a_o)*c'/n'; stabiliser m = max(log f + m, a_i), c and n kept / exp(m)", _BECK, 4,
          _cell("slstm", "SLSTMCell")),
    # Jozefowicz et al. 2015
    _spec("lstm-f", "LSTM without forget gate (f = 1)", _JOZ, 2, _gated(forget_gate=False)),
    _spec("lstm-i", "LSTM without input gate (i = 1)", _JOZ, 2, _gated(input_gate=False)),
    _spec("lstm-o", "LSTM without output gate (o = 1)", _JOZ, 2, _gated(output_gate=False)),
    _spec("lstm-b", "LSTM with forget-gate bias initialised to 1", _JOZ, 2, _gated(), torch_rnn="LSTM",
          forget_bias=1.0),
    _spec("mut1", "MUT1: z = s(Wz x), h' = tanh(Uh(r*h) + tanh(Px)) z + h(1-z)", _JOZ, 1,
          _cell("mut_cells", "MUT1Cell")),
    _spec("mut2", "MUT2: r = s(Px + Ur h), h' = tanh(Uh(r*h) + Wh x) z + h(1-z)", _JOZ, 1,
          _cell("mut_cells", "MUT2Cell")),
    _spec("mut3", "MUT3: z = s(Wz x + Uz tanh(h)), h' = tanh(Uh(r*h) + Wh x) z + h(1-z)", _JOZ, 1,
          _cell("mut_cells", "MUT3Cell")),
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
          _cell("lstm", "GateRecurrentLSTMCell")),
]

CELLS: dict[str, CellSpec] = {s.name: s for s in _SPECS}


def cell_names() -> list[str]:
    """Every cell name, in listing order."""
    return list(CELLS)


def describe_cells() -> list[tuple[str, str]]:
    """(name, one-line summary) for every cell, in listing order (for ``charlm cells``)."""
    return [(s.name, s.summary) for s in CELLS.values()]


def cell_registry_names(names: list[str], where: str = "") -> list[str]:
    """Cell names as the registry spells them (case and surrounding spaces ignored: ``LSTM`` is ``lstm``).

    The one check of cell names, for ``model.cell`` and ``compare --cells``: unknown names raise a
    :class:`CharlmError` that lists them as given (``where`` says where they came from) and the valid ones.
    """
    valid = cell_names()
    unknown = [n for n in names if n.strip().lower() not in valid]
    if unknown:
        listed = ", ".join(f"'{n}'" for n in unknown)
        raise CharlmError(f"unknown cell{'s' if len(unknown) > 1 else ''} {listed}{where}; "
                          f"valid cells: {', '.join(sorted(valid))}")
    return [n.strip().lower() for n in names]


def get_cell(name: str) -> CellSpec:
    """The spec for ``name``, spelled as :func:`cell_registry_names` allows (which raises, listing the valid
    names, for an unknown one)."""
    return CELLS[cell_registry_names([name])[0]]
