"""The C++ time loops of ``lstm-ln`` / ``lstm-bn`` (``native/csrc/norm_lstm.cpp``), run by
:class:`charlm.cells.norm_lstm_kernel.NormLSTMKernel` given :data:`CPP_LOOP`.

The Python kernel of :mod:`charlm.cells.norm_lstm_kernel` pays, every step, for a dozen ATen calls on
(B, 4H) rows, each a pass over memory with its own dispatch. The C++ loops do the same math in one
to five fused passes per step (the norm statistics, the gate nonlinearities, the cell update and the
cell norm), split between the threads, and call back into PyTorch only for the step's product.

The library is built on first use and cached by :mod:`charlm.native.build`; where it cannot be built the
Python kernel runs instead, after one warning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from charlm.cells.lstm_kernel import recurrent_weight_grad
from charlm.cells.norm_lstm_kernel import StepNorm
from charlm.cells.onednn_matmul import StepProduct
from charlm.native.build import CSRC, load_library

SOURCE = CSRC / "norm_lstm.cpp"
NAME = "charlm_norm_lstm"
# The cells that run the C++ loops (on the CPU, where it builds).
CELLS = ("lstm-ln", "lstm-bn")


def available() -> bool:
    """Whether the C++ kernel is on and loaded, building and loading it on the first call."""
    return load_library(SOURCE, NAME, "norm_lstm_forward", "lstm-ln / lstm-bn",
                        "they run the slower Python kernel")


def build_before_training(cell: str, device: torch.device) -> None:
    """Build (or load) the library now if a run of ``cell`` on ``device`` will use it, so that the build
    does not happen inside the first training step (nor count against the run's time budget)."""
    if cell in CELLS and device.type == "cpu":
        available()


class CppLoop:
    """The time loops of :class:`charlm.cells.norm_lstm_kernel.NormLSTMKernel` in C++ (the CPU).

    The loops also normalise W x step by step (so v may be laid out either way: time-major suits the
    C++ loops best) and sum the gains' and the shift's gradients; dW_hh is one matmul here afterwards.
    """

    name = "c++"
    batch_major_input = False

    @staticmethod
    def forward(ctx: Any, norm: StepNorm, inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        v, g_ih, shift, h0, c0, w_hh, g_hh, g_c, b_c = inputs
        T, B = v.shape[:2]
        running = list(norm.running) if norm.running is not None else []
        Hs, Cs, G, TC, Xi, Xh, rstd_in, rstd_hh, mean_c, rstd_c = torch.ops.charlm.norm_lstm_forward(
            v, g_ih, shift, h0, c0, w_hh, StepProduct(w_hh, B, T).packed, g_hh, g_c, b_c, norm.kind == "batch",
            running, norm.momentum, norm.eps,
        )
        ctx.save_for_backward(G, Cs, TC, Xi, Xh, rstd_in, rstd_hh, mean_c, rstd_c, Hs, h0, w_hh, g_ih, g_hh, g_c)
        return Hs, Hs[T - 1].clone(), Cs[T].clone()

    @staticmethod
    def backward(ctx: Any, norm: StepNorm, grads: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor | None, ...]:
        G, Cs, TC, Xi, Xh, rstd_in, rstd_hh, mean_c, rstd_c, Hs, h0, w_hh, g_ih, g_hh, g_c = ctx.saved_tensors
        T, B = G.shape[:2]
        d_v, d_r, dh, dc, d_gih, d_shift, d_ghh, d_gc, d_bc = torch.ops.charlm.norm_lstm_backward(
            *grads, G, Cs, TC, Xi, Xh, rstd_in, rstd_hh, mean_c, rstd_c, w_hh,
            StepProduct(w_hh.t(), B, T).packed, g_ih, g_hh, g_c, norm.kind == "batch",
        )
        d_w = recurrent_weight_grad(d_r, h0, Hs) if ctx.needs_input_grad[5] else None
        return d_v, d_gih, d_shift, dh, dc, d_w, d_ghh, d_gc, d_bc


CPP_LOOP = CppLoop()
