"""What a model does at every character of a text: its surprisal, its top next characters, and every unit
of every layer (hidden state h, cell state c where the cell has one, and each of the cell's gates).

:func:`trace` reads the text once from a zero state, in eval mode (no dropout), through each layer's own
cell arithmetic (:meth:`charlm.model.recurrent_layer.RecurrentLayer.steps`, which also covers the layers that
run a torch RNN kernel in training), and returns a :class:`Trace` of plain tensors. Position t of every record is the
moment just after reading character t: the state then, and the prediction of character t + 1.
``surprisal[t]`` is -ln p(text[t] | text[:t]) in nats (the first character has no context: NaN).

This module only computes; :mod:`charlm.tools.viz.page` turns a trace into a page, :mod:`charlm.tools.viz.features`
scores units against features of the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from charlm.data.vocab import Vocab
from charlm.model.char_lm import CharLM
from charlm.tools.viz.limits import MAX_CHARS
from charlm.util.errors import CharlmError

__all__ = ["MAX_CHARS", "TOP_K", "LayerTrace", "Trace", "check_length", "trace", "units_of"]
TOP_K = 5


@dataclass(frozen=True)
class LayerTrace:
    """One layer over the text: each quantity is (T, H), row t just after reading character t."""

    h: Tensor
    c: Tensor | None  # the cell state, for cells that have one (the LSTM family)
    gates: dict[str, Tensor]  # the cell's gates by name (i, f, g, o; r, z, n; ...); empty for rnn / irnn / linear

    def quantities(self) -> dict[str, Tensor]:
        """Every recorded quantity by name: ``h``, ``c`` where present, then the gates."""
        out = {"h": self.h}
        if self.c is not None:
            out["c"] = self.c
        out.update(self.gates)
        return out


@dataclass(frozen=True)
class Trace:
    """A text as the model read it. ``top_ids`` / ``top_probs`` (T, k): the k likeliest next characters
    after character t and their probabilities, likeliest first."""

    text: str
    cell: str
    layers: list[LayerTrace]
    surprisal: Tensor  # (T,) nats; NaN at 0
    top_ids: Tensor  # (T, k) int64
    top_probs: Tensor  # (T, k)


def units_of(tr: Trace, layers: set[int] | None = None,
             quantities: set[str] | None = None) -> list[tuple[int, str, Tensor]]:
    """(layer number from 1, quantity name, (T, H) values) of every recorded quantity, or only of the given
    layers / quantities (a quantity a layer lacks is skipped)."""
    return [(number, name, values)
            for number, layer in enumerate(tr.layers, start=1) if layers is None or number in layers
            for name, values in layer.quantities().items() if quantities is None or name in quantities]


def check_length(text: str, max_chars: int = MAX_CHARS, what: str = "the text") -> None:
    """One clear error for a text too short or too long to trace."""
    if len(text) < 1:
        raise CharlmError(f"{what} is empty; give at least one character")
    if len(text) > max_chars:
        raise CharlmError(f"{what} has {len(text):,} characters, more than the limit of {max_chars:,}; "
                          f"use a shorter text or raise the limit (--max-chars)")


@torch.no_grad()
def trace(model: CharLM, vocab: Vocab, text: str, *, top_k: int = TOP_K, max_chars: int = MAX_CHARS,
          what: str = "the text") -> Trace:
    """Read ``text`` from a zero state and record every character's surprisal, top-k next characters and
    every unit of every layer (see the module docstring). The model is put in eval mode."""
    check_length(text, max_chars, what)
    ids = vocab.encode(text, what=what)
    model.eval()
    device = next(model.parameters()).device
    x = model.encoder(ids.to(device).unsqueeze(0))  # (1, T, E)
    layers: list[LayerTrace] = []
    for layer, norm in zip(model.layers, model.norms, strict=True):
        states: list[tuple[Tensor, ...]] = []
        gates: dict[str, list[Tensor]] = {name: [] for name in layer.cell.gate_names}
        for state, step_gates in layer.steps(x):
            states.append(state)
            for name, value in step_gates.items():
                gates[name].append(value)
        h = torch.cat([s[0] for s in states])  # (T, H): batch of one
        c = torch.cat([s[1] for s in states]) if layer.num_states >= 2 else None
        layers.append(LayerTrace(h.cpu(), None if c is None else c.cpu(),
                                 {name: torch.cat(v).cpu() for name, v in gates.items()}))
        x = norm(h.unsqueeze(0))
    log_probs = torch.log_softmax(model.decoder(x[0]).float(), dim=-1).cpu()  # (T, V): prediction of t + 1
    surprisal = torch.full((len(text),), float("nan"))
    surprisal[1:] = -log_probs[:-1].gather(1, ids[1:, None]).squeeze(1)
    k = min(top_k, len(vocab))
    top = log_probs.topk(k, dim=-1)
    return Trace(text, layers=layers, cell=model.config.cell, surprisal=surprisal, top_ids=top.indices,
                 top_probs=top.values.exp())
