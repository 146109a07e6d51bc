"""Generation's step in our own fused C++ arithmetic, for models of the gated cells: the LSTM family (``lstm``,
``peephole``, ``lstm-f/i/o``, ``lstm-b``, ``np``, ``nig`` ... ``cifg``), ``gru``, ``lstm-ln`` and ``mogrifier``,
with or without ``model.layer_norm``.

At a few rows a step of the default 2 x 384 model is a handful of (rows, 384) x (384, 1536) products, and
PyTorch's general matrix product, with the dozen small ops around it, spends more time being called than
computing. ``native/csrc/fused_step.cpp`` packs the weights once and steps the whole stack, decoder included, in
one call; ``fused_sample`` draws and steps a run of characters in one call, each draw the one
:func:`charlm.generation.options.pick` makes from the same generator, so Python is not called per character.

Every cell shares the packing, the products and the draw; what differs is how a layer's products are cut
(:class:`Segment`: the gate-buffer columns a sum fills, from a bias or layer 0's table, through the input and
the recurrent weights) and the few loops of its update. The packing here:

- the gate blocks of the LSTMs are reordered from nn.LSTM's i, f, g, o to i, f, o, g (the sigmoid gates
  first), their biases, gains and shifts with them;
- layer 0's input product becomes a table of one row per character (E W_ih^T + b, by the route's own products;
  ``lstm-ln``'s normalised with its gain and shift), except for the Mogrifier, whose input is gated by h first;
- GRU's n gate keeps its input and recurrent sums apart (n = tanh(W_n x + b_in + r (U_n h + b_hn)));
- the Mogrifier's round matrices are halved (2 s(a) = 1 + tanh(a / 2)), as :meth:`MogrifierLSTMCell.prepare
  <charlm.cells.mogrifier.MogrifierLSTMCell.prepare>` does, and packed one after another.

Its sums run in a fixed order, so its logits do not depend on the thread count and differ from PyTorch's step
by rounding only (held to 1e-5 by the tests); a seed draws the same characters unless a draw falls within that
rounding of the boundary between two characters.

:mod:`charlm.model.fast_step` takes this route (its library holds this file too) for such models in float32 at
up to :data:`MAX_ROWS` rows, and the ATen op of ``model_step.cpp`` for the rest; ``off()`` turns this route
off inside a block. The packed weights are kept on the model and made again when a parameter changes (its
version) or is replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from charlm.cells.gru import GRUCell
from charlm.cells.lstm import GatedLSTMCell
from charlm.cells.mogrifier import MogrifierLSTMCell
from charlm.cells.norm_lstm import EPS as CELL_EPS
from charlm.cells.norm_lstm import LayerNormLSTMCell
from charlm.native.build import CSRC
from charlm.util.switch import Switch

if TYPE_CHECKING:
    from charlm.model.char_lm import CharLM, States

SOURCE = CSRC / "fused_step.cpp"
# Rows up to which the fused products beat PyTorch's: a tile of 8 rows reads each weight once for all of them,
# as a matrix product does (benchmarks/sampling.py, 1 and 16 streams).
MAX_ROWS = 16
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, the only one the C++ applies
PROBES = 64  # elements of each weight compared at every call, to see writes its version counter misses
_PACK = "_fused_step_pack"
_enabled = Switch()
_vectorised: bool | None = None  # this build's vector FMA (build()), asked once

# the layer kinds and the flags' bits of fused_step.cpp
GATED, GRU, NORM_LSTM, MOGRIFIER = 0, 1, 2, 3
GATE_BITS = (("input_gate", 1), ("forget_gate", 2), ("output_gate", 4), ("coupled", 8), ("g_tanh", 16),
             ("out_tanh", 32), ("peephole", 64))
LAYER_NORM, TABLE_NORMALISED = 128, 256
_EMPTY = torch.empty(0)


def off() -> AbstractContextManager[None]:
    """Inside the block generation takes the ATen op of charlm.model.fast_step instead (side-by-side checks)."""
    return _enabled.off()


@dataclass(frozen=True)
class Segment:
    """One sum of a layer's products: gate-buffer columns [first, first + outputs), from ``init`` (a bias) or
    layer 0's table (column ``table``), plus ``w_x`` x and ``w_h`` h (each packed, or absent)."""

    first: int
    outputs: int
    table: int = -1
    init: Tensor | None = None
    w_x: Tensor | None = None
    w_h: Tensor | None = None


@dataclass
class Pack:
    """What the C++ step reads: the flat tensor list and its layout (see the top of fused_step.cpp)."""

    tensors: list[Tensor]
    layout: list[int]
    states_per_layer: list[int]


def _kind(layer: Any) -> tuple[int, int] | None:
    """(kind, flags) of a layer this route steps, or None."""
    cell = layer.cell
    if type(cell) is GatedLSTMCell:
        return GATED, sum(bit for name, bit in GATE_BITS if getattr(cell.config, name))
    if type(cell) is MogrifierLSTMCell:
        return (MOGRIFIER, 0) if cell.rounds else (GATED, sum(bit for name, bit in GATE_BITS
                                                               if getattr(cell.config, name)))
    if type(cell) is GRUCell and not cell.reset_inside:
        return GRU, 0
    if type(cell) is LayerNormLSTMCell:
        return NORM_LSTM, 0
    return None


def takes_route(model: CharLM) -> bool:
    """Whether every layer (and its norm) of ``model`` is one this route steps."""
    return _sources(model) is not None


def _sources(model: CharLM) -> list[Tensor] | None:
    """Every tensor the pack is made from (to see when one changed), or None where a layer is not one of ours."""
    if model.decoder.bias is None:
        return None
    out = [model.encoder.weight, model.decoder.weight, model.decoder.bias]
    for layer, norm in zip(model.layers, model.norms, strict=True):
        if _kind(layer) is None:
            return None
        if isinstance(norm, nn.LayerNorm):
            if norm.weight is None or norm.bias is None or norm.eps != LAYER_NORM_EPS:
                return None
            out += [norm.weight, norm.bias]
        elif not isinstance(norm, nn.Identity):
            return None
        out += list(layer._parameters.values())
    return out


def _pack(w: Tensor) -> Tensor:
    return torch.ops.charlm.fused_pack_matrix.default(w)  # type: ignore[no-any-return]


def _rows(blocks: tuple[str, ...], hs: int) -> Tensor:
    """The row order of the LSTMs' gate blocks for the C++: the sigmoid gates i, f, o (those present), then g."""
    order = [b for b in ("i", "f", "o") if b in blocks] + ["g"]
    return torch.cat([torch.arange(blocks.index(b) * hs, (blocks.index(b) + 1) * hs) for b in order])


def _layer(layer: Any, norm: nn.Module, first_layer: bool, model: CharLM) -> tuple[list[int], list[Tensor],
                                                                                Tensor | None]:
    """One layer's layout and tensors, and layer 0's table where it has one."""
    kind, flags = _kind(layer)  # type: ignore[misc]
    p = {name: t.detach().float() for name, t in layer._raw().items()}
    hs, k_in = layer.hidden_size, p["weight_ih"].shape[1]
    embedding = model.encoder.weight.detach().float()
    segments: list[Segment] = []
    extras: list[Tensor] = []
    rounds = 0
    table = None
    if kind in (GATED, MOGRIFIER):
        blocks = layer.cell.config.blocks
        order = _rows(blocks, hs)
        w_ih, w_hh = p["weight_ih"][order], p["weight_hh"][order]
        bias = (p["bias_ih"] + p["bias_hh"])[order]
        outputs = len(blocks) * hs
        if first_layer and kind == GATED:
            table = torch.ops.charlm.fused_products.default(embedding, _pack(w_ih), bias)
            segments.append(Segment(0, outputs, table=0, w_h=_pack(w_hh)))
        else:
            segments.append(Segment(0, outputs, init=bias, w_x=_pack(w_ih), w_h=_pack(w_hh)))
        if "peephole" in p:
            extras.append(p["peephole"])
        if kind == MOGRIFIER:
            q = layer.cell.prepare(p)
            rounds = layer.cell.rounds
            extras.append(torch.cat([_pack(q[f"half_{name}"]).flatten() for name, _ in layer.cell._round_shapes()]))
    elif kind == GRU:
        w_ih, w_hh, b_ih, b_hh = p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
        rz, n = slice(0, 2 * hs), slice(2 * hs, 3 * hs)
        if first_layer:
            table = torch.ops.charlm.fused_products.default(embedding, _pack(w_ih),
                                                            torch.cat([b_ih[rz] + b_hh[rz], b_ih[n]]))
            segments += [Segment(0, 2 * hs, table=0, w_h=_pack(w_hh[rz])), Segment(2 * hs, hs, table=2 * hs)]
        else:
            segments += [Segment(0, 2 * hs, init=b_ih[rz] + b_hh[rz], w_x=_pack(w_ih[rz]), w_h=_pack(w_hh[rz])),
                         Segment(2 * hs, hs, init=b_ih[n], w_x=_pack(w_ih[n]))]
        segments.append(Segment(3 * hs, hs, init=b_hh[n], w_h=_pack(w_hh[n])))
    else:  # NORM_LSTM: LN(W x; g_ih) + LN(U h; g_hh) + b
        order = _rows(("i", "f", "g", "o"), hs)
        w_ih, w_hh = p["weight_ih"][order], p["weight_hh"][order]
        g_ih, g_hh, shift = p["ln_ih_weight"][order], p["ln_hh_weight"][order], (p["bias_ih"] + p["bias_hh"])[order]
        if first_layer:
            raw = torch.ops.charlm.fused_products.default(embedding, _pack(w_ih), torch.zeros(4 * hs))
            table = F.layer_norm(raw, (4 * hs,), g_ih, shift, CELL_EPS)
            flags |= TABLE_NORMALISED
            segments.append(Segment(0, 4 * hs, table=0))
        else:
            segments.append(Segment(0, 4 * hs, w_x=_pack(w_ih)))
        segments.append(Segment(4 * hs, 4 * hs, w_h=_pack(w_hh)))
        extras += [g_ih, g_hh, shift, p["ln_c_weight"], p["ln_c_bias"]]
    if isinstance(norm, nn.LayerNorm):
        flags |= LAYER_NORM
        extras += [norm.weight.detach().float(), norm.bias.detach().float()]
    layout = [kind, flags, hs, k_in, rounds, len(segments)]
    tensors: list[Tensor] = []
    for seg in segments:
        layout += [seg.first, seg.outputs, seg.table]
        tensors += [_EMPTY if t is None else t.contiguous() for t in (seg.init, seg.w_x, seg.w_h)]
    return layout, tensors + [t.contiguous() for t in extras], table


def make_pack(model: CharLM) -> Pack:
    """The model's weights packed for the C++ step (the model must take this route)."""
    with torch.no_grad():
        layout, tensors, table, states = [len(model.layers)], [], None, []
        for i, (layer, norm) in enumerate(zip(model.layers, model.norms, strict=True)):
            part_layout, part_tensors, part_table = _layer(layer, norm, i == 0, model)
            layout += part_layout
            tensors += part_tensors
            table = part_table if i == 0 else table
            states.append(1 if part_layout[0] == GRU else 2)
        embedding = model.encoder.weight.detach().float().contiguous() if table is None else _EMPTY
        head = [_pack(model.decoder.weight.detach()), model.decoder.bias.detach().float().contiguous(),
                _EMPTY if table is None else table.contiguous(), embedding]
        return Pack(head + tensors, layout, states)


def vectorised() -> bool:
    """Whether this build of the library computes with vector fused multiply-adds (AVX2 and FMA, AVX-512, or
    Arm's NEON). Built for PyTorch's capability ``DEFAULT`` (an x86 CPU without AVX2, or
    ``ATEN_CPU_CAPABILITY=default``) its products are SSE2 multiplies and adds, several times slower than the
    ATen op, whose matrix products pick their own instructions: there generation takes the ATen op, said once."""
    global _vectorised
    if _vectorised is None:
        _vectorised = build()[1]
        if not _vectorised:
            warnings.warn("charlm: this CPU (or ATEN_CPU_CAPABILITY) gives the fused sampling route no vector "
                          "fused multiply-adds (AVX2 and FMA), where it is slower than PyTorch's own products; "
                          "sampling takes the ATen op instead", RuntimeWarning, stacklevel=3)
    return _vectorised


def _probes(weights: list[Tensor]) -> list[Tensor]:
    """Views of about :data:`PROBES` elements of each weight, spread over all of it (every k-th element; all
    of a small one): they see any write into the weight's memory that touches one of them."""
    views = []
    for t in weights:
        flat = t.detach().view(-1) if t.is_contiguous() else t.detach().flatten()
        views.append(flat[:: max(1, flat.size(0) // PROBES)])
    return views


def packed(model: CharLM, loaded: Callable[[], bool]) -> Pack | None:
    """The model's weights packed for the fused step, or None where it does not take this route (or it is
    off, or ``loaded()``, which loads the library where it can, says it is not there, or this build is not
    :func:`vectorised`). The tensors are read from the modules at each call.

    Packed again when a parameter was replaced or changed in place: its version counter counts the writes
    autograd sees (an optimizer step, ``load_state_dict``); writes it does not see (through ``p.data``, a
    numpy view) are caught by comparing a sample of every weight's elements (:func:`_probes`) with their
    values at packing, which costs a small fraction of a step. A change that touches none of the sampled
    elements goes unseen: after such a write, :func:`forget` the pack."""
    if not _enabled:
        return None
    try:
        is_ours, key, probes, seen, pack = model.__dict__[_PACK]
    except KeyError:
        is_ours, key, probes, seen, pack = model.__dict__[_PACK] = (takes_route(model), None, [], None, None)
    if not is_ours or not loaded() or not vectorised():
        return None  # (found once: a model's layers do not change)
    weights = _sources(model)
    assert weights is not None
    now = tuple((t.data_ptr(), t._version) for t in weights)
    if now == key and torch.equal(torch.cat(probes), seen):
        return pack  # type: ignore[no-any-return]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in weights):
        return None
    pack = make_pack(model)
    probes = _probes(weights)
    model.__dict__[_PACK] = (is_ours, now, probes, torch.cat(probes), pack)
    return pack  # type: ignore[no-any-return]


def forget(model: CharLM) -> None:
    """Drop the model's packed weights: the next fused step packs them afresh."""
    model.__dict__.pop(_PACK, None)


def flat_states(states: States | None) -> list[Tensor]:
    """The states as the C++ ops take them: every layer's tensors in one list (none: the zero state)."""
    return [] if states is None else [t for state in states for t in state]


def _states(out: list[Tensor], first: int, pack: Pack) -> States:
    it: Iterator[Tensor] = iter(out[first:])
    return [tuple(next(it) for _ in range(n)) for n in pack.states_per_layer]


def step(x: Tensor, states: States | None, pack: Pack) -> tuple[Tensor, States]:
    """``model.step(x, states)`` for x (N,) of at most MAX_ROWS rows, through the fused op."""
    ids = x if x.dtype == torch.long else x.long()
    out = torch.ops.charlm.fused_step.default(ids, flat_states(states), pack.tensors, pack.layout)
    return out[0], _states(out, 1, pack)


def sample(logits: Tensor, temperature: float, generator: torch.Generator, states: States | None,
           pack: Pack, length: int) -> tuple[Tensor, Tensor, tuple[Tensor, States]]:
    """``length`` times ``pick(logits, temperature, None, generator)`` and ``model.step`` of it: the ids
    (length, N), the scores each was drawn from (length, N, V), and (logits, states) after the last."""
    out = torch.ops.charlm.fused_sample.default(logits, temperature, flat_states(states), pack.tensors, pack.layout,
                                                length, generator)
    return out[0], out[1], (out[2], _states(out, 3, pack))


def build() -> tuple[int, bool]:
    """(the packing's block of outputs, whether this build of the library has fused multiply-adds)."""
    block, fma = torch.ops.charlm.fused_build.default()
    return int(block), bool(fma)
