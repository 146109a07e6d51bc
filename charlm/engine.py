"""The recurrent-layer engine: one time loop for every cell, the native kernels where they fit.

A :class:`RecurrentLayer` is one layer (optionally bidirectional) of any cell in
:mod:`charlm.cells`. It owns the parameters under nn.LSTM / nn.GRU / nn.RNN names
(``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``, ``..._reverse``), so a layer's
``state_dict`` loads into the native module of the same cell and back.

Forward, custom cells: the input of every step is projected in one matmul, then the cell's step
runs over ``unbind(0)`` of the time-major projection (never ``x[:, t]``, whose backward writes a
full-size zero gradient per step) and the outputs are stacked once. LSTM-family cells (the gated
variants, FGR, lstm-ln, and lstm-bn in training) use hand-written backward-through-time kernels
(:mod:`charlm.cells.fused`, :mod:`charlm.cells.fused_norm`; for lstm-ln / lstm-bn on the CPU the C++
loops of :mod:`charlm.cells.native`) instead of autograd.

Forward, native cells (``lstm``, ``lstm-b``, ``np`` -> LSTM kernel; ``gru`` -> GRU; ``rnn`` /
``irnn`` -> RNN tanh / relu): the layer calls the ATen op behind nn.LSTM (``torch.lstm`` etc.)
with its own weight list. That is what ``nn.LSTM.forward`` does after its bookkeeping, minus
``flatten_parameters``, which on cuDNN would re-point our parameters into a fresh flat buffer
on every call once ``weight_hh`` is swapped for a dropped copy (the pitfall of the original
WeightDrop); gradients reach every weight in the list, so the raw ``weight_hh`` gets its gradient
through the dropout mask.

Under CPU autocast (``--precision bf16-mixed``) a native op that has no kernel in the autocast dtype on this
CPU (oneDNN's bfloat16 LSTM needs AVX-512) runs in float32 instead, after one warning
(:func:`cpu_autocast_runs`); GPUs are not probed.

Weight drop (DropConnect on ``weight_hh``, Merity et al. 2017): one mask per forward call, shared by
every time step (and a separate one per direction); eval uses the raw weights.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from charlm.cells import get_cell
from charlm.cells.base import INITS, CellState, Params
from charlm.config import ModelConfig
from charlm.errors import CharlmError
from charlm.regularizers import drop_weight

State = tuple[Tensor, ...]

_NATIVE_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_UNCOMPACTED = "RNN module weights are not part of single contiguous chunk"


@contextlib.contextmanager
def _quiet_uncompacted_weights(active: bool) -> Iterator[None]:
    """Silence cuDNN's "weights are not part of single contiguous chunk" warning, and only that.

    cuDNN wants all weights in one flat buffer; ours are separate parameters and a weight-dropped
    ``weight_hh`` is a fresh tensor each call, so the copy it warns about is inherent (and cheap:
    one layer's weights). On CPU the warning cannot occur and nothing is touched.
    """
    if not active:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNCOMPACTED, category=UserWarning)
        yield


def _native_op(kind: str, x: Tensor, state: State, weights: list[Tensor], train: bool, bidirectional: bool
               ) -> tuple[Tensor, State]:
    """The ATen op behind nn.LSTM / nn.GRU / nn.RNN, batch-first, one layer: output and final state."""
    args = (weights, True, 1, 0.0, train, bidirectional, True)
    if kind == "LSTM":
        out, h, c = torch.lstm(x, (state[0], state[1]), *args)
        return out, (h, c)
    fn = {"GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}[kind]
    out, h = fn(x, state[0], *args)
    return out, (h,)


@functools.cache
def cpu_autocast_runs(kind: str, dtype: torch.dtype) -> bool:
    """Whether the CPU's ``kind`` op (``"LSTM"``, ``"GRU"``, ...) trains under ``torch.autocast("cpu", dtype)``.

    Under CPU autocast ``torch.lstm`` runs oneDNN's LSTM in ``dtype``, which oneDNN has only for some CPUs
    (bfloat16 needs AVX-512; float16 was missing even on an AVX-512 FP16 CPU with PyTorch 2.13); elsewhere
    it raises "could not create a primitive descriptor". Probed once per process and kind with a one-step
    call, forward and backward, through the public op; a warning says when the layers fall back to float32."""
    gates = {"LSTM": 4, "GRU": 3}.get(kind, 1)
    try:  # (the first call may come inside a validation, where gradients are off)
        with torch.inference_mode(False), torch.enable_grad():
            weights = [torch.full((gates, 1), 0.5, requires_grad=True) for _ in range(2)]
            weights += [torch.zeros(gates, requires_grad=True) for _ in range(2)]
            state = (torch.zeros(1, 1, 1),) * (2 if kind == "LSTM" else 1)
            with torch.autocast("cpu", dtype=dtype):
                out, _ = _native_op(kind, torch.ones(1, 1, 1), state, weights, True, False)
            out.float().sum().backward()
    except RuntimeError:
        low = str(dtype).removeprefix("torch.")
        warnings.warn(
            f"charlm: this CPU has no {low} {kind} kernel, so under mixed precision the {kind} layers run in "
            f"float32 (the rest of the model in {low}).",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


class RecurrentLayer(nn.Module):
    """One recurrent layer of any registered cell, batch-first, optionally bidirectional.

    Args:
        cell: a name from :data:`charlm.cells.CELLS`.
        input_size, hidden_size: feature sizes of x and h.
        bidirectional: run a second, reversed direction; outputs are concatenated (D*H features).
        weight_drop: DropConnect probability on ``weight_hh`` (one mask per forward call).
        weight_drop_variational: drop whole rows of ``weight_hh`` instead of single weights.
        native: use the fused nn.LSTM / nn.GRU / nn.RNN kernel when the cell is exactly that kernel.
        init: "xavier" or "kaiming" for each input gate block (recurrent blocks are orthogonal).
        forget_bias: initial forget-gate bias of the LSTM family; the default is the config's
            (``model.forget_bias``, :class:`charlm.config.ModelConfig`). ``lstm-b`` forces 1.0.
        compile: run the custom step through ``torch.compile`` (custom cells only; off by default).

    States are tuples of (D, B, S) tensors, D = 2 if bidirectional else 1, as nn.LSTM's h_0: (h,) for
    single-state cells, (h, c) for the LSTM family, (h, c, gates) for ``fgr``. The output, like
    nn.LSTM's with ``batch_first=True``, may be a non-contiguous view.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        *,
        bidirectional: bool = False,
        weight_drop: float = 0.0,
        weight_drop_variational: bool = False,
        native: bool = True,
        init: str = "xavier",
        forget_bias: float = ModelConfig.forget_bias,
        compile: bool = False,
    ) -> None:
        super().__init__()
        spec = get_cell(cell)
        if init not in INITS:
            raise CharlmError(f"unknown init '{init}'; valid inits: {', '.join(INITS)}")
        if not 0.0 <= weight_drop < 1.0:
            raise CharlmError(f"weight_drop must be in [0, 1), got {weight_drop}")
        self.spec = spec
        self.cell_name = spec.name
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.weight_drop = weight_drop
        self.weight_drop_variational = weight_drop_variational
        self.init = init
        self.forget_bias = spec.forget_bias if spec.forget_bias is not None else forget_bias
        self.cell = spec.build(input_size, hidden_size)
        self.num_states: int = self.cell.num_states
        self.native: bool = native and spec.native is not None
        self.compile_step = compile  # (not ``self.compile``: that would shadow nn.Module.compile)
        self._compiled_step: Callable[..., CellState] | None = None
        if compile and not self.native:
            # Dynamo keeps its variants per code object, shared by every layer of this cell: layer sizes x
            # train/eval x fresh/carried state x the one-row eval tail already make ~12, past its default
            # limit of 8, after which the step silently runs eager. Allow enough for a whole model.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled_step = torch.compile(self.cell.step)
            self.cell.step_fn = self._compiled_step
        self._suffixes = ("", "_reverse")[: self.num_directions]
        self._param_names = tuple(self.cell.param_shapes())
        self._buffer_names = tuple(self.cell.buffer_shapes())
        # (base name, registered name) per direction, for quick lookups in forward / step
        self._param_keys = [tuple((n, f"{n}_l0{sfx}") for n in self._param_names) for sfx in self._suffixes]
        self._buffer_keys = [tuple((n, f"{n}_l0{sfx}") for n in self._buffer_names) for sfx in self._suffixes]
        for sfx in self._suffixes:
            for name, shape in self.cell.param_shapes().items():
                self.register_parameter(f"{name}_l0{sfx}", nn.Parameter(torch.empty(shape)))
            for name, shape in self.cell.buffer_shapes().items():
                self.register_buffer(f"{name}_l0{sfx}", torch.zeros(shape))
        self._next_t = 0  # time index of the next step() (batch norm's per-step statistics)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.cell_name!r}, {self.input_size}, {self.hidden_size}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.weight_drop:
            s += f", weight_drop={self.weight_drop}"
            s += ", weight_drop_variational=True" if self.weight_drop_variational else ""
        return s + f", native={self.native}"

    # -- parameters ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Re-initialise every direction (per-gate-block init, see :class:`charlm.cells.base.Cell`)."""
        for d in range(self.num_directions):
            self.cell.reset_parameters(self._raw(d), self.init, self.forget_bias)
            for name, shape in self.cell.buffer_shapes().items():
                self._buffers[f"{name}_l0{self._suffixes[d]}"] = torch.zeros(
                    shape, device=self.weight_ih_l0.device, dtype=self.weight_ih_l0.dtype
                )
        self._next_t = 0

    def _raw(self, d: int) -> Params:
        params, buffers = self._parameters, self._buffers
        p: Params = {base: params[name] for base, name in self._param_keys[d]}  # type: ignore[misc]
        for base, name in self._buffer_keys[d]:
            p[base] = buffers[name]  # type: ignore[assignment]
        return p

    def _params(self, d: int) -> Params:
        """Direction d's tensors with ``weight_hh`` weight-dropped (a fresh mask per call in training)."""
        p = self._raw(d)
        if self.weight_drop > 0.0 and self.training:
            p["weight_hh"] = drop_weight(p["weight_hh"], self.weight_drop, self.weight_drop_variational, True)
        return p

    def _grow_buffers(self, steps: int) -> None:
        if not self._buffer_names:
            return
        for sfx in self._suffixes:
            bufs = {name: getattr(self, f"{name}_l0{sfx}") for name in self._buffer_names}
            for name, new in self.cell.grow_buffers(bufs, steps).items():
                if new is not bufs[name]:
                    self._buffers[f"{name}_l0{sfx}"] = new

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        # per-time-step statistics grow with the training length: adopt the saved length
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if (
                buf is not None and isinstance(saved, Tensor) and saved.dim() == 2 and buf.dim() == 2
                and saved.shape[1] == buf.shape[1] and saved.shape[0] != buf.shape[0]
            ):
                self._buffers[name] = buf.new_zeros(saved.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- state --------------------------------------------------------------------------------
    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """Zero state: a tuple of ``num_states`` tensors (D, batch_size, S)."""
        ref = self.weight_ih_l0
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return tuple(
            torch.zeros(self.num_directions, batch_size, size, device=device, dtype=dtype)
            for size in self.cell.state_sizes()
        )

    # -- computation --------------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x (B, T, in) -> output (B, T, D*H) and the final state (each (D, B, S))."""
        if x.dim() != 3:
            raise CharlmError(f"RecurrentLayer expects (batch, time, features), got shape {tuple(x.shape)}")
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        self._next_t = x.shape[1]
        if self.native:
            return self._forward_native(x, state)
        if self.training:
            self._grow_buffers(x.shape[1])
        x_tm = x.transpose(0, 1)
        outs: list[Tensor] = []
        finals: list[CellState] = []
        for d in range(self.num_directions):
            q = self.cell.prepare(self._params(d))
            hs, final = self.cell.run(x_tm if d == 0 else x_tm.flip(0), tuple(s[d] for s in state), q)
            outs.append(hs if d == 0 else hs.flip(0))
            finals.append(final)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
        new_state = tuple(torch.stack([f[k] for f in finals]) for k in range(self.num_states))
        return out.transpose(0, 1), new_state

    def _forward_native(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        weights: list[Tensor] = []
        for d in range(self.num_directions):
            p = self._params(d)
            weights.extend(p[name] for name in _NATIVE_WEIGHTS)
        kind = self.spec.native or ""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not cpu_autocast_runs(
                kind, torch.get_autocast_dtype("cpu")):
            # the op has no kernel in the autocast dtype on this CPU: run it in float32, which is exact
            with torch.autocast("cpu", enabled=False):
                return _native_op(kind, x.float(), tuple(s.float() for s in state), [w.float() for w in weights],
                                  self.training, self.bidirectional)
        with _quiet_uncompacted_weights(x.is_cuda):
            return _native_op(kind, x, state, weights, self.training, self.bidirectional)

    def step(self, x: Tensor, state: State | None = None, *, t: int | None = None) -> tuple[Tensor, State]:
        """One time step (unidirectional layers): x (B, in) -> output (B, H) and the new state.

        Computes exactly what :meth:`forward` computes for that step, with the same weights, but
        without the sequence machinery (native cells use the single-step ATen cell ops). Meant for
        sampling; in training mode each call draws a fresh weight-drop mask.

        ``t`` (only ``lstm-bn`` reads it: per-step statistics) is the step's time index; by default
        it continues from the previous ``forward`` / ``step`` call, and is 0 when ``state`` is None.
        """
        if self.bidirectional:
            raise CharlmError("step() runs one direction; this layer is bidirectional")
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
            self._next_t = 0
        if t is not None:
            self._next_t = t
        kind = self.spec.native if self.native else None
        t = self._next_t
        if kind is None and self.training:
            self._grow_buffers(t + 1)
        p = self._params(0)
        st = tuple(s[0] for s in state)
        w = (p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"])
        if kind == "LSTM":
            st = torch.lstm_cell(x, (st[0], st[1]), *w)
        elif kind == "GRU":
            st = (torch.gru_cell(x, st[0], *w),)
        elif kind is not None:
            cell_op = torch.rnn_tanh_cell if kind == "RNN_TANH" else torch.rnn_relu_cell
            st = (cell_op(x, st[0], *w),)
        else:
            q = self.cell.prepare(p)
            xw = self.cell.project(x.unsqueeze(0), q, t)[0]
            st = (self._compiled_step or self.cell.step)(xw, st, q, t)
        self._next_t += 1
        return st[0], tuple(s.unsqueeze(0) for s in st)


class RecurrentStack(nn.Module):
    """``num_layers`` RecurrentLayers of one cell, with an optional module (e.g. dropout) between layers.

    Layer k > 0 takes D*hidden_size inputs; ``layer_kwargs`` go to every layer. States are a list
    with one :data:`State` per layer. :meth:`native_state_dict` / :meth:`load_native_state_dict`
    translate to and from a multi-layer nn.LSTM / nn.GRU / nn.RNN (``weight_ih_l1`` is
    ``layers.1.weight_ih_l0``).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        num_layers: int,
        *,
        bidirectional: bool = False,
        between: nn.Module | None = None,
        **layer_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise CharlmError(f"num_layers must be at least 1, got {num_layers}")
        d = 2 if bidirectional else 1
        self.layers = nn.ModuleList(
            RecurrentLayer(
                cell, input_size if k == 0 else d * hidden_size, hidden_size, bidirectional=bidirectional,
                **layer_kwargs,
            )
            for k in range(num_layers)
        )
        self.between = between

    def initial_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[State]:
        return [layer.initial_state(batch_size, device, dtype) for layer in self.layers]

    def forward(self, x: Tensor, states: list[State] | None = None) -> tuple[Tensor, list[State]]:
        """x (B, T, in) -> output of the last layer (B, T, D*H) and every layer's final state."""
        new_states: list[State] = []
        for k, layer in enumerate(self.layers):
            if k > 0 and self.between is not None:
                x = self.between(x)
            x, st = layer(x, None if states is None else states[k])
            new_states.append(st)
        return x, new_states

    def native_state_dict(self) -> dict[str, Tensor]:
        """The parameters under multi-layer native names (``weight_hh_l1_reverse`` etc.)."""
        out: dict[str, Tensor] = {}
        for k, layer in enumerate(self.layers):
            for name, value in layer.state_dict().items():
                out[re.sub(r"_l0(_reverse)?$", rf"_l{k}\1", name)] = value
        return out

    def load_native_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True) -> None:
        """Load parameters named as in a multi-layer native module (e.g. ``nn.LSTM.state_dict()``)."""
        per_layer: list[dict[str, Tensor]] = [{} for _ in self.layers]
        for name, value in state_dict.items():
            m = re.fullmatch(r"(.+)_l(\d+)(_reverse)?", name)
            if m is None or int(m.group(2)) >= len(self.layers):
                raise CharlmError(f"unexpected parameter '{name}' for a {len(self.layers)}-layer stack")
            per_layer[int(m.group(2))][f"{m.group(1)}_l0{m.group(3) or ''}"] = value
        for layer, sd in zip(self.layers, per_layer, strict=True):
            layer.load_state_dict(sd, strict=strict)
