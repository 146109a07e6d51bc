"""The cell contract shared by every recurrence, plus the per-gate-block initialisation.

A cell is the arithmetic of one recurrent layer: which parameters it needs, how to initialise them,
how to project the whole input sequence in one matmul, and one time step. The parameters themselves
live on :class:`charlm.model.recurrent_layer.RecurrentLayer` under nn.LSTM-style names (``weight_ih_l0``,
``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``), so weights move freely between a custom cell and
the nn.LSTM / nn.GRU / nn.RNN module of the same cell.

Cells with a hand-written forward/backward-through-time kernel (the LSTM family, the GRUs and MUTs) say so through
:meth:`Cell.has_kernel_for`; this module knows no kernel. The input projection goes through
:func:`charlm.cells.onednn_matmul.linear`, the matrix-product layer under every cell and kernel.

Shapes (time-major inside the engine): the projected input ``xw`` is (T, B, K); a state is a tuple
of (B, S) tensors whose first entry is the output h.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from charlm.cells.onednn_matmul import linear
from charlm.util.errors import CharlmError

Params = dict[str, Tensor]
CellState = tuple[Tensor, ...]
Gates = dict[str, Tensor]
StepFn = Callable[[Tensor, CellState, Params, int], CellState]

INITS = ("xavier", "kaiming")


class Cell(nn.Module):
    """Base class: one layer's recurrence. Holds no parameters of its own.

    Subclasses name their states (:attr:`state_names`, h first) and implement :meth:`param_shapes`,
    :meth:`step` (a gated cell: :meth:`step_gates` and :attr:`gate_names` instead) and, where the
    default does not fit, :meth:`project`, :meth:`reset_parameters`, :meth:`sequence` and, for a cell
    with a hand-written kernel or a parallel form, :meth:`run` (and :meth:`has_kernel_for`).
    It is an ``nn.Module`` only so that ``train()`` / ``eval()`` reach it (batch norm reads
    ``self.training``); its state_dict is empty.

    A cell without hidden-to-hidden weights (``mingru``, ``minlstm``) leaves ``weight_hh`` out of
    :meth:`param_shapes` and sets :attr:`dropped_weight` to the matrix weight drop acts on instead.
    """

    state_names: tuple[str, ...] = ("h",)  # the state tensors, h first (ONNX export names its inputs by them)
    gate_names: tuple[str, ...] = ()  # the gates :meth:`step_gates` returns, in order
    dropped_weight: str = "weight_hh"  # the matrix weight drop (DropConnect, model.weight_drop) applies to

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.kernel_on = True  # a cell with a hand-written kernel runs it when True (off: the autograd loop)
        self._compiled_step: StepFn | None = None  # set by compile_step()

    @property
    def num_states(self) -> int:
        """How many tensors a state holds (h, and c, ... where the cell has them)."""
        return len(self.state_names)

    # -- parameters ---------------------------------------------------------------------------
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Base names (no ``_l0`` suffix) and shapes of this cell's parameters."""
        raise NotImplementedError

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Base names and initial shapes of buffers (running statistics); none by default."""
        return {}

    def state_sizes(self) -> tuple[int, ...]:
        """Feature size of each state tensor; (H,) or (H, H) for the usual cells."""
        return (self.hidden_size,) * self.num_states

    def forget_block(self) -> tuple[int, float] | None:
        """(block index in the biases, sign) that the forget bias initialises, or None."""
        return None

    def reset_parameters(self, p: Params, init: str, forget_bias: float) -> None:
        """Per-gate-block init: ``init`` per input block, orthogonal per recurrent block (where the cell has
        ``weight_hh``), zero biases, ``forget_bias`` on the forget block of ``bias_ih``; anything else is left
        to the subclass."""
        h = self.hidden_size
        with torch.no_grad():
            for name, orth in (("weight_ih", False), ("weight_hh", True)):
                if name not in p:
                    continue
                w = p[name]
                for k in range(w.shape[0] // h):
                    block = w[k * h : (k + 1) * h]
                    if orth:
                        nn.init.orthogonal_(block)
                    else:
                        init_input_block(block, init)
            for name in ("bias_ih", "bias_hh"):
                if name in p:
                    p[name].zero_()
            fb = self.forget_block()
            if fb is not None and "bias_ih" in p:
                k, sign = fb
                p["bias_ih"][k * h : (k + 1) * h].fill_(sign * forget_bias)

    # -- computation --------------------------------------------------------------------------
    def has_kernel_for(self, x: Tensor) -> bool:
        """Whether this cell has a hand-written forward/backward-through-time kernel that runs on ``x``
        (its dtype, device, autocast); a cell with a kernel overrides this. None here."""
        return False

    def uses_kernel(self, x: Tensor) -> bool:
        """Whether :meth:`run` takes the hand-written kernel for ``x``: the cell has one that runs on x, it is
        on (:attr:`kernel_on`), and the step is not compiled."""
        return self.kernel_on and self._compiled_step is None and self.has_kernel_for(x)

    def compile_step(self) -> None:
        """Run :meth:`step` through ``torch.compile`` from now on, in the generic time loop (which then
        takes the place of any hand-written kernel) and in the layer's single steps."""
        # Dynamo keeps its variants per code object, shared by every layer of this cell: layer sizes x
        # train/eval x fresh/carried state x the one-row eval tail already make ~12, past its default
        # limit of 8, after which the step silently runs eager. Allow enough for a whole model.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_step = torch.compile(self.step)

    @property
    def step_compiled(self) -> bool:
        """Whether :meth:`compile_step` was called."""
        return self._compiled_step is not None

    @property
    def step_fn(self) -> StepFn:
        """:meth:`step`, or its compiled version after :meth:`compile_step`."""
        return self._compiled_step or self.step

    def prepare(self, p: Params) -> Params:
        """Per-forward-call preparation (transposes, folded biases); ``p`` already weight-dropped."""
        return p

    def project(self, x: Tensor, q: Params, t0: int = 0) -> Tensor:
        """Input projection of every time step in one matmul: (T, B, in) -> (T, B, K).

        ``t0`` is the time index of the first step (only batch norm's per-step statistics use it)."""
        return linear(x, q["weight_ih"], q["bias_ih"] + q["bias_hh"])

    def step(self, xw: Tensor, state: CellState, q: Params, t: int) -> CellState:
        """One time step: projected input (B, K), state -> new state (h first)."""
        return self.step_gates(xw, state, q, t)[0]

    def step_gates(self, xw: Tensor, state: CellState, q: Params, t: int) -> tuple[CellState, Gates]:
        """:meth:`step`, plus that step's gate activations by name (each (B, H), the names of
        :attr:`gate_names`). A gated cell implements its step here and :meth:`step` keeps the state; a cell
        without gates implements :meth:`step` only."""
        if type(self).step is Cell.step:
            raise NotImplementedError(f"{type(self).__name__} implements neither step nor step_gates")
        return self.step(xw, state, q, t), {}

    def run(self, x: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """Project x (T, B, in) and run every step: outputs (T, B, H) and the last state. A cell whose
        hand-written kernel owns the input projection overrides this."""
        return self.sequence(self.project(x, q), state, q)

    def sequence(self, xw: Tensor, state: CellState, q: Params) -> tuple[Tensor, CellState]:
        """Run every step of ``xw`` (T, B, K); returns outputs (T, B, H) and the last state."""
        step = self.step_fn
        outs: list[Tensor] = []
        for t, xt in enumerate(xw.unbind(0)):
            state = step(xt, state, q, t)
            outs.append(state[0])
        return torch.stack(outs, 0), state

    def grow_buffers(self, buffers: Params, steps: int) -> Params:
        """Return buffers resized for a training sequence of ``steps`` steps (batch norm only)."""
        return buffers


def init_input_block(block: Tensor, init: str) -> None:
    """Initialise one [H, in] input block in place: Glorot-uniform or He-uniform (fan_in, gain 1)."""
    if init == "xavier":
        nn.init.xavier_uniform_(block)
    elif init == "kaiming":
        nn.init.kaiming_uniform_(block, nonlinearity="linear")
    else:
        raise CharlmError(f"unknown init '{init}'; valid inits: {', '.join(INITS)}")


def standard_shapes(
    gates_ih: int, gates_hh: int, input_size: int, hidden_size: int
) -> dict[str, tuple[int, ...]]:
    """nn.LSTM-style parameter shapes: ``weight_ih`` [Gi*H, in], ``weight_hh`` [Gh*H, H], two biases."""
    h = hidden_size
    return {
        "weight_ih": (gates_ih * h, input_size),
        "weight_hh": (gates_hh * h, h),
        "bias_ih": (gates_ih * h,),
        "bias_hh": (gates_hh * h,),
    }
