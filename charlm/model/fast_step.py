"""``CharLM.step`` in one C++ call (``native/csrc/model_step.cpp``), for the models whose every layer it knows.

Generating a character at one row is a few dozen small ATen calls (the embedding row, per layer the gate
products, the nonlinearities and the state update, the decoder); from Python each pays the interpreter
and the dispatcher's Python entry, which at that size costs more than the arithmetic. The C++ op calls
the same ATen functions in the same order with the same arguments, so its logits and states are those
of the Python step, bit for bit, and a seeded sample is the same text.

It runs for models in eval mode on the CPU, outside autocast, whose layers are all

- a cell with a torch RNN kernel in use (``lstm``, ``lstm-b``, ``np``, ``gru``, ``rnn``, ``irnn``:
  ``torch.lstm_cell`` / ``gru_cell`` / ``rnn_*_cell``), or
- a gated LSTM of :class:`charlm.cells.lstm.GatedLSTMCell` (``peephole``, ``lstm-f/i/o``, ``nig`` ...
  ``cifg``, and the LSTMs with ``model.torch_rnn=false``),

each followed by nothing or a LayerNorm (``model.layer_norm``). Every other model (``gru-cho``,
``lstm-ln``, ``lstm-bn``, ``fgr``, ``mut1-3``, ``linear``; training mode, with its weight drop; CUDA)
runs the Python step, as does every model where the library cannot be built: it is built like the
C++ kernel of ``lstm-ln`` / ``lstm-bn``, by the same machinery (:func:`charlm.native.build.load_library`:
the cache folder, the lock, one warning when it cannot be built, ``CHARLM_NATIVE=0`` to turn it off,
``cpp_off()`` inside a block).

Generation steps a model through :func:`step` (this op, or the fused route of :mod:`charlm.model.fused_step`,
where one runs; else :meth:`CharLM.step <charlm.model.char_lm.CharLM.step>`, the plain PyTorch step) and draws
runs of characters through :func:`sample`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from charlm.cells.lstm import GatedLSTMCell
from charlm.model import fused_step
from charlm.native.build import CSRC, load_library
from charlm.util.errors import NOT_FINITE, CharlmError

if TYPE_CHECKING:
    from charlm.model.char_lm import CharLM, States

# one library for both routes of CharLM.step: the ATen op, and our own fused step of charlm.model.fused_step
SOURCES = (CSRC / "model_step.cpp", fused_step.SOURCE)
NAME = "charlm_model_step"
# the layer kinds and the gated cells' parts, as model_step.cpp numbers them
TORCH_RNN_KINDS = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
GATED = 4
GATE_BITS = (("input_gate", 1), ("forget_gate", 2), ("output_gate", 4), ("coupled", 8), ("g_tanh", 16),
             ("out_tanh", 32), ("peephole", 64))
_LAYER_PARAMS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")  # (+ peephole_l0 where there)
_NONE = torch.empty(0)  # a tensor the op reads as "this layer has none"


Source = tuple[dict[str, Any], str] | None  # where a tensor of the op's list lives (a module's parameters), or none


@dataclass(frozen=True)
class Plan:
    """What the op needs to know of a model besides its tensors: each layer's kind and flags, the norms' eps,
    and where each of the op's tensors lives."""

    kinds: list[int]
    flags: list[int]
    norm_eps: float
    sources: list[Source]

    def tensors(self) -> list[Tensor]:
        """The model's tensors in the op's order, read from their modules at each call (so a parameter
        replaced by a new one is seen; without nn.Module's attribute lookups, which would cost more)."""
        out = []
        for source in self.sources:
            t = None if source is None else source[0][source[1]]
            out.append(_NONE if t is None else t)
        return out


def available() -> bool:
    """Whether the op is on and loaded, building and loading it on the first call."""
    return load_library(SOURCES, NAME, "model_step", "the model's single step (sampling)",
                                      "CharLM.step runs its slower Python code")


def build_before_training(model: CharLM, device: torch.device) -> None:
    """Build (or load) the op now if the samples printed during training will step ``model`` through it, so
    that the build is not part of the first validation (nor of the run's time budget)."""
    if device.type == "cpu" and plan_for(model) is not None:
        available()


def plan_for(model: CharLM) -> Plan | None:
    """The op's description of ``model``, or None where one of its layers or norms is not one it knows."""
    kinds, flags, eps = [], [], set()
    decoder = model.decoder
    sources: list[Source] = [(model.encoder._parameters, "weight"), (decoder._parameters, "weight"),
                             (decoder._parameters, "bias")]
    for layer, norm in zip(model.layers, model.norms, strict=True):
        if layer.torch_rnn and layer.spec.torch_rnn in TORCH_RNN_KINDS:
            kinds.append(TORCH_RNN_KINDS[layer.spec.torch_rnn])
            flags.append(0)
        elif type(layer.cell) is GatedLSTMCell:
            kinds.append(GATED)
            config = layer.cell.config
            flags.append(sum(bit for name, bit in GATE_BITS if getattr(config, name)))
        else:
            return None
        sources += [(layer._parameters, name) for name in _LAYER_PARAMS]
        sources.append((layer._parameters, "peephole_l0") if "peephole_l0" in layer._parameters else None)
        if isinstance(norm, nn.LayerNorm):
            if norm.weight is None or norm.bias is None or norm.normalized_shape != (layer.hidden_size,):
                return None
            eps.add(norm.eps)
            sources += [(norm._parameters, "weight"), (norm._parameters, "bias")]
        elif isinstance(norm, nn.Identity):
            sources += [None, None]
        else:
            return None
    if len(eps) > 1:
        return None
    return Plan(kinds, flags, min(eps, default=1e-5), sources)


def _plan(model: CharLM) -> Plan | None:
    """:func:`plan_for`, worked out once per model (its layers do not change after it is built)."""
    try:
        return model.__dict__["_fast_step_plan"]  # type: ignore[no-any-return]
    except KeyError:
        plan = model.__dict__["_fast_step_plan"] = plan_for(model)
        return plan


def step(model: CharLM, x: Tensor, states: States | None = None) -> tuple[Tensor, States]:
    """``model.step(x, states)``: through a C++ route where one runs for this model, else in PyTorch."""
    fast = cpp_step(model, x, states)
    return fast if fast is not None else model.step(x, states)


def cpp_step(model: CharLM, x: Tensor, states: States | None) -> tuple[Tensor, States] | None:
    """``model.step(x, states)`` through the op, or None where it does not run (the caller steps in Python)."""
    if not _may_run(model, x):
        return None
    pack = _fused_pack(model) if x.size(0) <= fused_step.MAX_ROWS else None
    if pack is not None:
        logits, fused_states = fused_step.step(x, states, pack)
        _count_step(model, states)
        return logits, fused_states
    plan = _plan(model)
    if plan is None or not available():
        return None
    flat = fused_step.flat_states(states)
    out = torch.ops.charlm.model_step.default(x, flat, plan.tensors(), plan.kinds, plan.flags, plan.norm_eps)
    new_states: States = []
    i = 1
    for kind in plan.kinds:
        n = 2 if kind in (TORCH_RNN_KINDS["LSTM"], GATED) else 1  # (h, c) or (h,)
        new_states.append(tuple(out[i:i + n]))
        i += n
    _count_step(model, states)
    return out[0], new_states


def sample(model: CharLM, logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator, states: States | None,
           length: int) -> tuple[Tensor, Tensor, tuple[Tensor, States], Tensor] | None:
    """``length`` times ``pick(logits, temperature, top_k, generator, top_p)`` and ``model.step`` of the ids,
    in one C++ call (:mod:`charlm.model.fused_step`): the ids (length, N), the scores each was drawn from
    (length, N, V), (logits, states) after the last, and the generator's state before the draws; None
    where that call does not run (the caller picks and steps itself; the generator untouched)."""
    if not (temperature >= torch.finfo(torch.float32).tiny and temperature != float("inf")):
        return None  # greedy, or the float64 scores of a tiny temperature: pick's own code
    if (top_k is not None and top_k < logits.size(-1)) or (top_p is not None and top_p < 1.0):
        return None
    if logits.size(0) > fused_step.MAX_ROWS or not _may_run(model, logits):
        return None
    pack = _fused_pack(model)
    if pack is None:
        return None
    rng = generator.get_state()  # before the run's draws: Continuation.finish gives back those not taken
    try:
        out = fused_step.sample(logits, temperature, generator, states, pack, length)
    except RuntimeError as err:  # NaN / inf scores (as pick says them)
        if "not finite" not in str(err):
            raise
        raise CharlmError(NOT_FINITE) from None
    _count_step(model, states, length)
    return (*out, rng)


def _fused_pack(model: CharLM) -> fused_step.Pack | None:
    """The fused route's packed weights, where the model takes that route and the library is loaded."""
    return fused_step.packed(model, available)


def _may_run(model: CharLM, x: Tensor) -> bool:
    return not model.training and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def _count_step(model: CharLM, states: States | None, steps: int = 1) -> None:
    """Count ``steps`` steps as RecurrentLayer.step does; a plain attribute, set past nn.Module.__setattr__'s
    costly type checks."""
    for layer in model.layers:
        object.__setattr__(layer, "_next_t", (0 if states is None else layer._next_t) + steps)
