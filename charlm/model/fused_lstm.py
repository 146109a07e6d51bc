"""Generation's step for stacks of plain LSTM layers (the default model), in our own fused C++ arithmetic.

At one or a few rows a step of the 2 x 256 model is three (rows, 256) x (256, 1024) products, and
PyTorch's general matrix product, with the dozen small ops around it, spends more time being called
than computing. ``native/csrc/fused_lstm.cpp`` packs the weights once (layer 0's input product becomes a
table of one row per character, each matrix is laid out in the order its product reads it) and steps
the whole stack, decoder included, in one call; ``fused_lstm_sample`` draws and steps a run of
characters in one call, each draw the one :func:`charlm.generation.options.pick` makes from the same generator, so
Python is not called per character at all.

Its sums run in a fixed order with fused multiply-adds, so its logits do not depend on the thread count
and differ from PyTorch's step by rounding only (held to 1e-5 by the tests); a seed draws the same
characters unless a draw falls within that rounding of the boundary between two characters.

:mod:`charlm.model.fast_step` takes this route (its library holds both C++ files) for models whose layers are
all ``lstm`` on the torch kernel with no norm, in float32, at up to :data:`MAX_ROWS` rows, and the
ATen op of ``model_step.cpp`` for the rest; ``off()`` turns this route off inside a block. The packed
weights are kept on the model and made again when a parameter changes or is replaced (:func:`packed`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from charlm.native.build import CSRC
from charlm.util.switch import Switch

if TYPE_CHECKING:
    from charlm.model.char_lm import CharLM, States

SOURCE = CSRC / "fused_lstm.cpp"
# Rows up to which the fused products beat PyTorch's: each row streams the weights once more, while a
# matrix product reads them once for all rows (benchmarks/sampling.py, 1 and 16 streams).
MAX_ROWS = 4
PROBES = 64  # elements of each weight compared at every call, to see writes its version counter misses
_PACK = "_fused_lstm_pack"
_enabled = Switch()


def off() -> AbstractContextManager[None]:
    """Inside the block CharLM.step takes the ATen op of charlm.model.fast_step instead (for side-by-side checks)."""
    return _enabled.off()


def _sources(model: CharLM) -> list[tuple[dict[str, Any], str]] | None:
    """Where the tensors of fused_lstm_pack's list live (a module's parameters and a name), or None where
    the model is not a stack of plain LSTM layers."""
    if model.config.cell != "lstm" or model.decoder.bias is None:
        return None
    out: list[tuple[dict[str, Any], str]] = [(model.encoder._parameters, "weight")]
    for layer, norm in zip(model.layers, model.norms, strict=True):
        if not (layer.torch_rnn and layer.spec.torch_rnn == "LSTM" and isinstance(norm, nn.Identity)):
            return None
        out += [(layer._parameters, name) for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]
    return [*out, (model.decoder._parameters, "weight"), (model.decoder._parameters, "bias")]


def _probes(weights: list[Tensor]) -> list[Tensor]:
    """Views of about :data:`PROBES` elements of each weight, spread over all of it (every k-th element; all
    of a small one): they see any write into the weight's memory that touches one of them."""
    views = []
    for t in weights:
        flat = t.detach().view(-1) if t.is_contiguous() else t.detach()
        views.append(flat[:: max(1, flat.size(0) // PROBES)])
    return views


def packed(model: CharLM, loaded: Callable[[], bool]) -> list[Tensor] | None:
    """The model's weights packed for the fused step, or None where it does not take this route (or it is
    off, or ``loaded()``, which loads the library where it can, says it is not there). The tensors are read
    from the modules at each call, without nn.Module's attribute lookups.

    Packed again when a parameter was replaced or changed in place: its version counter counts the writes
    autograd sees (an optimizer step, ``load_state_dict``); writes it does not see (through ``p.data``, a
    numpy view) are caught by comparing a sample of every weight's elements (:func:`_probes`) with their
    values at packing, which costs a small fraction of a step. A change that touches none of the sampled
    elements goes unseen: after such a write, :func:`forget` the pack."""
    if not _enabled:
        return None
    try:
        sources, key, probes, seen, pack = model.__dict__[_PACK]
    except KeyError:
        sources, key, probes, seen, pack = model.__dict__[_PACK] = (_sources(model), None, [], None, None)
    if sources is None or not loaded():
        return None  # (the sources found once: a model's layers do not change)
    weights = [d[name] for d, name in sources]
    now = tuple((t.data_ptr(), t._version) for t in weights)
    if now == key and torch.equal(torch.cat(probes), seen):
        return pack  # type: ignore[no-any-return]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in weights):
        return None
    with torch.no_grad():
        pack = torch.ops.charlm.fused_lstm_pack.default(weights)
    probes = _probes(weights)
    model.__dict__[_PACK] = (sources, now, probes, torch.cat(probes), pack)
    return pack  # type: ignore[no-any-return]


def forget(model: CharLM) -> None:
    """Drop the model's packed weights: the next fused step packs them afresh."""
    model.__dict__.pop(_PACK, None)


def flat_states(states: States | None) -> list[Tensor]:
    """The states as the C++ ops take them: every layer's tensors in one list (none: the zero state)."""
    return [] if states is None else [t for state in states for t in state]


def _states(out: list[Tensor], first: int) -> States:
    return [(out[i], out[i + 1]) for i in range(first, len(out), 2)]


def step(x: Tensor, states: States | None, pack: list[Tensor]) -> tuple[Tensor, States]:
    """``model.step(x, states)`` for x (N,) of at most MAX_ROWS rows, through the fused op."""
    out = torch.ops.charlm.fused_lstm_step.default(x if x.dtype == torch.long else x.long(), flat_states(states), pack)
    return out[0], _states(out, 1)


def sample(logits: Tensor, temperature: float, generator: torch.Generator, states: States | None,
           pack: list[Tensor], length: int) -> tuple[Tensor, Tensor, tuple[Tensor, States]]:
    """``length`` times ``pick(logits, temperature, None, generator)`` and ``model.step`` of it: the ids
    (length, N), the scores each was drawn from (length, N, V), and (logits, states) after the last."""
    out = torch.ops.charlm.fused_lstm_sample.default(logits, temperature, flat_states(states), pack, length, generator)
    return out[0], out[1], (out[2], _states(out, 3))
