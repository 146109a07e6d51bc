"""The recurrent-layer engine: one time loop for every cell, the torch RNN kernels where they fit.

A :class:`RecurrentLayer` is one layer of any cell in :mod:`charlm.cells`, run forward in time (a causal
language model has no use for a backward direction). It owns the parameters under nn.LSTM / nn.GRU /
nn.RNN names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``), so a layer's
``state_dict`` loads into the one-layer torch module of the same cell and back.

Forward, custom cells: the input of every step is projected in one matmul, then the cell's step
runs over ``unbind(0)`` of the time-major projection (never ``x[:, t]``, whose backward writes a
full-size zero gradient per step) and the outputs are stacked once. LSTM-family cells (the gated
variants, FGR, mogrifier, lstm-ln, and lstm-bn in training) use hand-written backward-through-time kernels
(:mod:`charlm.cells.lstm_kernel`, :mod:`charlm.cells.mogrifier_kernel`,
:mod:`charlm.cells.norm_lstm_kernel`; for lstm-ln / lstm-bn on the CPU
the C++ loops of :mod:`charlm.cells.norm_lstm_cpp`) instead of autograd.

Forward, cells with a torch RNN kernel (``lstm``, ``lstm-b``, ``np`` -> LSTM; ``gru`` -> GRU; ``rnn`` /
``irnn`` -> RNN tanh / relu; switched off by ``model.torch_rnn=false``): the layer calls the ATen op
behind nn.LSTM (``torch.lstm`` etc.) with its own weight list. That is what ``nn.LSTM.forward`` does
after its bookkeeping, minus ``flatten_parameters``, which on cuDNN would re-point our parameters into
a fresh flat buffer on every call once ``weight_hh`` is swapped for a dropped copy (the pitfall of the
original WeightDrop); gradients reach every weight in the list, so the raw ``weight_hh`` gets its
gradient through the dropout mask.

Under CPU autocast (``--precision bf16-mixed``) a torch RNN op that has no kernel in the autocast dtype on this
CPU (oneDNN's bfloat16 LSTM needs AVX-512) runs in float32 instead, after one warning
(:func:`cpu_autocast_runs`); GPUs are not probed.

Weight drop (DropConnect on ``weight_hh``, Merity et al. 2017): one mask per forward call, shared by
every time step; eval uses the raw weights. A cell without hidden-to-hidden weights (``mingru``,
``minlstm``) names another matrix (:attr:`charlm.cells.base.Cell.dropped_weight`: their input matrix
``weight_ih``), so ``model.weight_drop`` regularises every cell and the default config trains them all.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from charlm.cells.base import INITS, Gates, Params
from charlm.cells.registry import get_cell
from charlm.config import ModelConfig
from charlm.model.regularizers import drop_weight
from charlm.util.errors import CharlmError

State = tuple[Tensor, ...]

_TORCH_RNN_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
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


def _torch_rnn_op(kind: str, x: Tensor, state: State, weights: list[Tensor], train: bool) -> tuple[Tensor, State]:
    """The ATen op behind nn.LSTM / nn.GRU / nn.RNN, batch-first, one layer, one direction: output and final
    state."""
    args = (weights, True, 1, 0.0, train, False, True)
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
                out, _ = _torch_rnn_op(kind, torch.ones(1, 1, 1), state, weights, True)
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
    """One recurrent layer of any registered cell, batch-first.

    Args:
        cell: a name from :data:`charlm.cells.registry.CELLS`.
        input_size, hidden_size: feature sizes of x and h.
        weight_drop: DropConnect probability on ``weight_hh`` (one mask per forward call); on ``weight_ih``
            for a cell without ``weight_hh`` (:attr:`charlm.cells.base.Cell.dropped_weight`).
        weight_drop_variational: drop whole rows of that matrix instead of single weights.
        torch_rnn: use the torch RNN kernel (the ATen op of nn.LSTM / nn.GRU / nn.RNN) when the cell is
            exactly what it computes (:attr:`charlm.cells.registry.CellSpec.torch_rnn`).
        init: "xavier" or "kaiming" for each input gate block (recurrent blocks are orthogonal).
        forget_bias: initial forget-gate bias of the LSTM family; the default is the config's
            (``model.forget_bias``, :class:`charlm.config.ModelConfig`). ``lstm-b`` forces 1.0.
        compile: run the custom step through ``torch.compile`` (:meth:`charlm.cells.base.Cell.compile_step`;
            cells that run a torch RNN kernel ignore it; off by default).
        cell_options: :class:`charlm.config.ModelConfig` keys of one cell (``mogrifier_rounds``, ...); the
            cell takes those its :attr:`charlm.cells.registry.CellSpec.options` names and ignores the rest.

    States are tuples of (1, B, S) tensors, as nn.LSTM's h_0 for one layer: (h,) for single-state cells,
    (h, c) for the LSTM family, (h, c, gates) for ``fgr``. The output, like nn.LSTM's with
    ``batch_first=True``, may be a non-contiguous view.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        *,
        weight_drop: float = 0.0,
        weight_drop_variational: bool = False,
        torch_rnn: bool = True,
        init: str = "xavier",
        forget_bias: float = ModelConfig.forget_bias,
        compile: bool = False,
        cell_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        spec = get_cell(cell)
        if init not in INITS:
            raise CharlmError(f"unknown init '{init}'; valid inits: {', '.join(INITS)}")
        self.spec = spec
        self.cell_name = spec.name
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.weight_drop = weight_drop
        self.weight_drop_variational = weight_drop_variational
        self.init = init
        self.forget_bias = spec.forget_bias if spec.forget_bias is not None else forget_bias
        options = {k: v for k, v in (cell_options or {}).items() if k in spec.options}
        self.cell = spec.build(input_size, hidden_size, **options)
        self.num_states: int = self.cell.num_states
        self.torch_rnn: bool = torch_rnn and spec.torch_rnn is not None
        # a torch_rnn layer runs the cell's kernel instead on a CPU, where that is faster (CellSpec.kernel_first_on_cpu)
        self.kernel_first_on_cpu: bool = spec.kernel_first_on_cpu
        if compile and not self.torch_rnn:
            self.cell.compile_step()
        self._buffer_names = tuple(self.cell.buffer_shapes())
        # (base name, registered name), for quick lookups in forward / step
        self._param_keys = tuple((n, f"{n}_l0") for n in self.cell.param_shapes())
        self._buffer_keys = tuple((n, f"{n}_l0") for n in self._buffer_names)
        for name, shape in self.cell.param_shapes().items():
            self.register_parameter(f"{name}_l0", nn.Parameter(torch.empty(shape)))
        for name, shape in self.cell.buffer_shapes().items():
            self.register_buffer(f"{name}_l0", torch.zeros(shape))
        self._next_t = 0  # time index of the next step() (batch norm's per-step statistics)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = f"{self.cell_name!r}, {self.input_size}, {self.hidden_size}"
        if self.weight_drop:
            s += f", weight_drop={self.weight_drop}"
            s += ", weight_drop_variational=True" if self.weight_drop_variational else ""
        return s + f", torch_rnn={self.torch_rnn}"

    # -- parameters ---------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Re-initialise (per-gate-block init, see :class:`charlm.cells.base.Cell`)."""
        self.cell.reset_parameters(self._raw(), self.init, self.forget_bias)
        for name, shape in self.cell.buffer_shapes().items():
            self._buffers[f"{name}_l0"] = torch.zeros(
                shape, device=self.weight_ih_l0.device, dtype=self.weight_ih_l0.dtype
            )
        self._next_t = 0

    def _raw(self) -> Params:
        params, buffers = self._parameters, self._buffers
        p: Params = {base: params[name] for base, name in self._param_keys}  # type: ignore[misc]
        for base, name in self._buffer_keys:
            p[base] = buffers[name]  # type: ignore[assignment]
        return p

    def _params(self) -> Params:
        """The layer's tensors with ``weight_hh`` (the cell's :attr:`~charlm.cells.base.Cell.dropped_weight`)
        weight-dropped (a fresh mask per call in training)."""
        p = self._raw()
        if self.weight_drop > 0.0 and self.training:
            name = self.cell.dropped_weight
            p[name] = drop_weight(p[name], self.weight_drop, self.weight_drop_variational, True)
        return p

    def _grow_buffers(self, steps: int) -> None:
        if not self._buffer_names:
            return
        bufs = {name: getattr(self, f"{name}_l0") for name in self._buffer_names}
        for name, new in self.cell.grow_buffers(bufs, steps).items():
            if new is not bufs[name]:
                self._buffers[f"{name}_l0"] = new

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
        """Zero state: a tuple of ``num_states`` tensors (1, batch_size, S)."""
        ref = self.weight_ih_l0
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return tuple(
            torch.zeros(1, batch_size, size, device=device, dtype=dtype)
            for size in self.cell.state_sizes()
        )

    # -- computation --------------------------------------------------------------------------
    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x (B, T, in) -> output (B, T, H) and the final state (each (1, B, S))."""
        if x.dim() != 3:
            raise CharlmError(f"RecurrentLayer expects (batch, time, features), got shape {tuple(x.shape)}")
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        self._next_t = x.shape[1]
        if self.runs_torch_rnn(x):
            return self._forward_torch_rnn(x, state)
        if self.training:
            self._grow_buffers(x.shape[1])
        q = self.cell.prepare(self._params())
        hs, final = self.cell.run(x.transpose(0, 1), tuple(s[0] for s in state), q)
        return hs.transpose(0, 1), tuple(s.unsqueeze(0) for s in final)

    def runs_torch_rnn(self, x: Tensor) -> bool:
        """Whether :meth:`forward` runs the torch RNN op on ``x`` (B, T, in): where the layer has one, except on a CPU
        for a cell whose kernel is the faster there (:attr:`kernel_first_on_cpu`), for more than one row (one row
        is the op's) and where that kernel runs on x (float32 / float64, no autocast)."""
        if not self.torch_rnn:
            return False
        kernel_first = self.kernel_first_on_cpu and x.device.type == "cpu" and x.shape[0] > 1
        return not (kernel_first and self.cell.uses_kernel(x))

    def _forward_torch_rnn(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        p = self._params()
        weights = [p[name] for name in _TORCH_RNN_WEIGHTS]
        kind = self.spec.torch_rnn or ""
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not cpu_autocast_runs(
                kind, torch.get_autocast_dtype("cpu")):
            # the op has no kernel in the autocast dtype on this CPU: run it in float32, which is exact
            with torch.autocast("cpu", enabled=False):
                return _torch_rnn_op(kind, x.float(), tuple(s.float() for s in state), [w.float() for w in weights],
                                     self.training)
        with _quiet_uncompacted_weights(x.is_cuda):
            return _torch_rnn_op(kind, x, state, weights, self.training)

    def steps(self, x: Tensor, state: State | None = None) -> Iterator[tuple[State, Gates]]:
        """x (B, T, in): yields each step's new state (a tuple of (B, S), h first) and its gate activations by
        name (each (B, H); :attr:`charlm.cells.base.Cell.gate_names`), one step at a time, from time index 0.

        Always the cell's own arithmetic (:meth:`charlm.cells.base.Cell.step_gates`), also for a layer whose
        :meth:`forward` runs a torch RNN kernel: the cell computes what that kernel computes, from the same
        weights. For looking inside a layer (``charlm viz``, ``charlm gradients``), not for speed; use it in
        eval mode. Gradients flow through every yielded tensor, so a step's h can be differentiated against.
        """
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        q = self.cell.prepare(self._params())
        xw = self.cell.project(x.transpose(0, 1), q, 0)
        st = tuple(s[0] for s in state)
        for t, xt in enumerate(xw.unbind(0)):
            st, gates = self.cell.step_gates(xt, st, q, t)
            yield st, gates

    def step(self, x: Tensor, state: State | None = None, *, t: int | None = None) -> tuple[Tensor, State]:
        """One time step: x (B, in) -> output (B, H) and the new state.

        Computes exactly what :meth:`forward` computes for that step, with the same weights, but
        without the sequence machinery (torch RNN cells use the single-step ATen cell ops). Meant for
        sampling; in training mode each call draws a fresh weight-drop mask.

        ``t`` (only ``lstm-bn`` reads it: per-step statistics) is the step's time index; by default
        it continues from the previous ``forward`` / ``step`` call, and is 0 when ``state`` is None.
        """
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
            self._next_t = 0
        if t is not None:
            self._next_t = t
        kind = self.spec.torch_rnn if self.torch_rnn else None
        t = self._next_t
        if kind is None and self.training:
            self._grow_buffers(t + 1)
        p = self._params()
        st = tuple(s[0] for s in state)
        w = tuple(p[name] for name in _TORCH_RNN_WEIGHTS) if kind is not None else ()
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
            st = self.cell.step_fn(xw, st, q, t)
        self._next_t += 1
        return st[0], tuple(s.unsqueeze(0) for s in st)
